"""Token store: layout, shard writes, random access, streaming, dask view, errors."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import ConfigError, InputError
from stages.store import (
    create_token_store,
    open_token_store,
    resize_token_store,
    shard_ranges,
    write_shard,
)
from stages.store.reader import _Recycled

N, GRID, DIM, LHW, SHARD = 7, (2, 3), 4, (4, 6), 3


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.standard_normal((N, *GRID, DIM)).astype(np.float32),
        "tokens_flip": rng.standard_normal((N, *GRID, DIM)).astype(np.float32),
        "labels": rng.integers(-1, 27, (N, *LHW)),
        "rgb": rng.integers(0, 256, (N, *LHW, 3)),
    }


def _build(path: Path, *, with_rgb: bool = True, with_flip: bool = True) -> dict[str, np.ndarray]:
    d = _data()
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=with_rgb,
                       with_flip=with_flip, attrs={"backbone": "vit_small", "res": 224})
    for k, (a, b) in enumerate(shard_ranges(N, SHARD)):
        write_shard(path, k, tokens=d["tokens"][a:b], labels=d["labels"][a:b],
                    rgb=d["rgb"][a:b] if with_rgb else None,
                    tokens_flip=d["tokens_flip"][a:b] if with_flip else None,
                    ids=[f"img{i:03d}" for i in range(a, b)])
    return d


def test_shard_ranges():
    assert shard_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert shard_ranges(6, 3) == [(0, 3), (3, 6)]
    assert shard_ranges(2, 5) == [(0, 2)]
    assert shard_ranges(0, 5) == []
    with pytest.raises(ConfigError, match="shard_size"):
        shard_ranges(5, 0)


def test_layout_dtypes_chunks_shards(tmp_path):
    path = tmp_path / "t.zarr"
    _build(path)
    g = zarr.open_group(str(path), mode="r")
    assert g["tokens"].dtype == np.float16 and g["tokens"].shape == (N, *GRID, DIM)
    assert g["tokens"].chunks == (1, *GRID, DIM) and g["tokens"].shards == (SHARD, *GRID, DIM)
    assert g["tokens_flip"].shards == (SHARD, *GRID, DIM)
    assert g["labels"].dtype == np.int16 and g["labels"].chunks == (1, *LHW)
    assert g["rgb"].dtype == np.uint8 and g["rgb"].shape == (N, *LHW, 3)
    assert g["ids"].shape == (N,) and g["ids"].chunks == (SHARD,)
    # one file per shard per array: 3 shards
    assert sorted(p.name for p in (path / "tokens" / "c").iterdir()) == ["0", "1", "2"]
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["attributes"]["res"] == 224


def test_roundtrip_random_access(tmp_path):
    path = tmp_path / "t.zarr"
    d = _build(path)
    s = open_token_store(path)
    assert (s.n, s.grid, s.dim, s.label_hw, s.shard_size) == (N, GRID, DIM, LHW, SHARD)
    assert s.has_rgb and s.has_flip
    assert s.attrs == {"backbone": "vit_small", "res": 224}
    assert s.ids == [f"img{i:03d}" for i in range(N)]
    idx = [6, 0, 3, 3, 1]
    got = s.get_tokens(idx)
    assert got.dtype == np.float32 and got.shape == (5, *GRID, DIM)
    np.testing.assert_array_equal(got, d["tokens"][idx].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(s.get_tokens(idx, flip=True),
                                  d["tokens_flip"][idx].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(s.get_labels(idx), d["labels"][idx])
    assert s.get_labels(idx).dtype == np.int16
    np.testing.assert_array_equal(s.get_rgb(np.array(idx)), d["rgb"][idx])
    assert s.get_tokens([]).shape == (0, *GRID, DIM)
    with pytest.raises(InputError, match=r"\[0, 7\)"):
        s.get_tokens([7])
    with pytest.raises(InputError, match=r"\[0, 7\)"):
        s.get_tokens([-1])


def test_random_access_reads_only_requested_chunks(tmp_path):
    """A missing (never written) shard does not matter to reads of other shards' samples; reading it is an error."""
    path = tmp_path / "t.zarr"
    d = _data()
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=False,
                       with_flip=False)
    write_shard(path, 1, tokens=d["tokens"][3:6], labels=d["labels"][3:6], ids=["a", "b", "c"])
    s = open_token_store(path)
    np.testing.assert_array_equal(s.get_tokens([4]), d["tokens"][[4]].astype(np.float16).astype(np.float32))
    with pytest.raises(InputError, match=r"array 'labels' is incomplete \(sample 0, file .*labels/c/0/0/0: shard file "
                                         "missing\\)"):
        s.get_labels([0])  # unwritten: an error, never fill values
    assert not (path / "tokens" / "c" / "0").exists()


def test_iter_batches(tmp_path):
    path = tmp_path / "t.zarr"
    d = _build(path)
    s = open_token_store(path)
    batches = list(s.iter_batches(2, arrays=("tokens", "labels"), start=1))
    assert [b["index"].tolist() for b in batches] == [[1, 2], [3, 4], [5, 6]]
    cat = np.concatenate([b["tokens"] for b in batches])
    assert cat.dtype == np.float32
    np.testing.assert_array_equal(cat, d["tokens"][1:].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), d["labels"][1:])
    batches = list(s.iter_batches(4, arrays=("rgb", "tokens_flip"), stop=6, tokens_dtype=np.float16))
    assert [len(b["index"]) for b in batches] == [4, 2]
    assert batches[0]["tokens_flip"].dtype == np.float16
    np.testing.assert_array_equal(np.concatenate([b["rgb"] for b in batches]), d["rgb"][:6])
    assert [b["ids"].tolist() for b in s.iter_batches(3, arrays=("ids",), start=1)] == [
        ["img001", "img002", "img003"], ["img004", "img005", "img006"]]
    assert next(s.iter_batches(2, tokens_dtype=None))["tokens"].dtype == np.float16  # None: as stored
    assert list(s.iter_batches(3, start=4, stop=4)) == []
    with pytest.raises(InputError, match="range"):
        list(s.iter_batches(2, start=5, stop=9))
    with pytest.raises(ConfigError, match="batch_size"):
        list(s.iter_batches(0))


def test_iter_batches_reuses_only_arrays_nobody_holds(tmp_path):
    """A stream's arrays are taken back (:class:`_Recycled`) once the consumer dropped them, never while
    anything (a kept batch, a view, a torch tensor sharing its memory) still references them."""
    pool = _Recycled(keep=8)
    first = pool.take((2, 3), np.dtype(np.float32))
    ref = weakref.ref(first)
    del first
    assert pool.take((2, 3), np.dtype(np.float32)) is ref()  # dropped: reused
    assert pool.take((2, 3), np.dtype(np.float16)) is not ref()  # another dtype: another array
    for holder in (lambda a: a[1:], lambda a: torch.from_numpy(a), lambda a: [a]):
        taken = pool.take((4,), np.dtype(np.int16))
        ref, held = weakref.ref(taken), holder(taken)
        del taken
        assert pool.take((4,), np.dtype(np.int16)) is not ref()
        del held
    path = tmp_path / "t.zarr"
    d = _build(path)
    s = open_token_store(path)
    want = d["tokens"].astype(np.float16).astype(np.float32)
    kept = [(b["index"][0], b["tokens"][:, :1], torch.from_numpy(b["labels"]))
            for b in s.iter_batches(1, arrays=("tokens", "labels"))]
    for i, view, labels in kept:
        np.testing.assert_array_equal(view, want[i:i + 1, :1])
        np.testing.assert_array_equal(labels.numpy(), d["labels"][i:i + 1])


def test_dask_tokens(tmp_path):
    path = tmp_path / "t.zarr"
    d = _build(path)
    s = open_token_store(path)
    h, w = GRID
    flat = s.dask_tokens()
    assert flat.shape == (N * h * w, DIM) and flat.dtype == np.float16
    assert flat.chunks[0] == (SHARD * h * w, SHARD * h * w, 1 * h * w)
    np.testing.assert_array_equal(flat.compute(), d["tokens"].astype(np.float16).reshape(-1, DIM))
    full = s.dask_tokens(flatten=False)
    assert full.shape == (N, h, w, DIM)
    np.testing.assert_allclose(full.mean(axis=(0, 1, 2), dtype=np.float64).compute(),
                               d["tokens"].astype(np.float16).astype(np.float64).mean(axis=(0, 1, 2)))
    (path / "tokens" / "c" / "1" / "0" / "0" / "0").unlink()  # a partial copy: an error, never zeros
    with pytest.raises(InputError, match=r"array 'tokens' is incomplete \(sample 3, .*shard file missing"):
        open_token_store(path).dask_tokens().compute()


def test_write_shard_validation(tmp_path):
    path = tmp_path / "t.zarr"
    d = _data()
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=True,
                       with_flip=False)
    ok = {"tokens": d["tokens"][:3], "labels": d["labels"][:3], "rgb": d["rgb"][:3], "ids": ["a", "b", "c"]}
    bad_tok = d["tokens"][:3].copy()
    bad_tok[1, 0, 0, 2] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        write_shard(path, 0, **{**ok, "tokens": bad_tok})
    big = d["tokens"][:3].copy()
    big[0, 0, 0, 0] = 1e6  # overflows float16
    with pytest.raises(InputError, match="float16"):
        write_shard(path, 0, **{**ok, "tokens": big})
    assert not (path / "tokens" / "c" / "0").exists()  # nothing written
    with pytest.raises(InputError, match="shape"):
        write_shard(path, 2, **{**ok, "ids": ["a"]})  # last shard holds 1 sample
    with pytest.raises(InputError, match="shard_index"):
        write_shard(path, 3, **ok)
    with pytest.raises(InputError, match="'rgb'"):
        write_shard(path, 0, **{**ok, "rgb": None})
    with pytest.raises(InputError, match="tokens_flip"):
        write_shard(path, 0, **ok, tokens_flip=d["tokens"][:3])
    with pytest.raises(InputError, match="labels"):
        write_shard(path, 0, **{**ok, "labels": ok["labels"] - 5})
    with pytest.raises(InputError, match="ids"):
        write_shard(path, 0, **{**ok, "ids": ["a"]})
    # torch tensors are accepted; rewriting a shard replaces it
    write_shard(path, 0, **{**ok, "tokens": torch.from_numpy(d["tokens"][:3])})
    write_shard(path, 0, **{**ok, "tokens": d["tokens"][:3] * 2})
    np.testing.assert_array_equal(open_token_store(path).get_tokens([1]),
                                  (d["tokens"][[1]] * 2).astype(np.float16).astype(np.float32))


def test_killed_write_leaves_shard_rewritable(tmp_path):
    """A shard file cut short by a killed writer is simply overwritten by the re-run."""
    path = tmp_path / "t.zarr"
    d = _build(path, with_rgb=False, with_flip=False)
    for shard in ("1", "2"):  # a middle shard and the short last one (written read-modify-write by zarr)
        f = path / "tokens" / "c" / shard / "0" / "0" / "0"
        f.write_bytes(f.read_bytes()[:10])
    for k, (a, b) in ((1, (3, 6)), (2, (6, 7))):
        write_shard(path, k, tokens=d["tokens"][a:b], labels=d["labels"][a:b], ids=list("xyz")[: b - a])
    s = open_token_store(path)
    np.testing.assert_array_equal(s.get_tokens(range(N)), d["tokens"].astype(np.float16).astype(np.float32))


def test_create_errors(tmp_path):
    path = tmp_path / "t.zarr"
    kw = {"n": N, "grid": GRID, "dim": DIM, "label_hw": LHW, "shard_size": SHARD, "with_rgb": False,
          "with_flip": False}
    with pytest.raises(ConfigError, match="dim"):
        create_token_store(path, **{**kw, "dim": 0})
    with pytest.raises(ConfigError, match="reserved"):
        create_token_store(path, **kw, attrs={"stegopipe": 1})
    create_token_store(path, **kw)
    with pytest.raises(InputError, match="already exists"):
        create_token_store(path, **kw)


def test_resize(tmp_path):
    path = tmp_path / "t.zarr"
    d = _data()
    create_token_store(path, n=0, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=False,
                       with_flip=False)
    assert open_token_store(path).n == 0
    resize_token_store(path, 3)
    write_shard(path, 0, tokens=d["tokens"][:3], labels=d["labels"][:3], ids=["a", "b", "c"])
    resize_token_store(path, 5)
    write_shard(path, 1, tokens=d["tokens"][3:5], labels=d["labels"][3:5], ids=["d", "e"])
    s = open_token_store(path)
    assert s.n == 5 and s.ids == list("abcde")
    np.testing.assert_array_equal(s.get_labels(range(5)), d["labels"][:5])


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_token_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="plain"):
        open_token_store(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", attributes={"x": 1})
    with pytest.raises(InputError, match="not a token store"):
        open_token_store(tmp_path / "other.zarr")
    path = tmp_path / "t.zarr"
    _build(path, with_rgb=False, with_flip=False)
    g = zarr.open_group(str(path), mode="r+")
    del g["labels"]
    g.create_array("labels", shape=(N, *LHW), dtype="int32", chunks=(1, *LHW))
    with pytest.raises(InputError, match=r"'labels' is int32"):
        open_token_store(path)


def test_missing_optional_array(tmp_path):
    path = tmp_path / "t.zarr"
    _build(path, with_rgb=False, with_flip=False)
    s = open_token_store(path)
    assert s.arrays == ("tokens", "labels", "ids")
    with pytest.raises(InputError, match="no array 'rgb'"):
        s.get_rgb([0])
    with pytest.raises(InputError, match="no array 'tokens_flip'"):
        s.dask_tokens(flip=True)


def test_a_flipped_byte_in_a_token_chunk_fails_the_read(tmp_path: Path) -> None:
    """Raw fp16 token chunks carry a crc32c: corruption is an InputError naming the store, not wrong numbers."""
    import glob

    path = tmp_path / "s.zarr"
    store = create_token_store(path, n=4, grid=(2, 2), dim=8, label_hw=(4, 4), shard_size=2, with_rgb=False,
                               with_flip=False)
    for shard in range(2):
        write_shard(store, shard, tokens=np.ones((2, 2, 2, 8), np.float16), labels=np.zeros((2, 4, 4), np.int16),
                    ids=["a", "b"])
    shard_file = sorted(glob.glob(str(path / "tokens" / "c" / "*" / "*" / "*" / "*")))[0]
    data = bytearray(Path(shard_file).read_bytes())
    data[20] ^= 0xFF
    Path(shard_file).write_bytes(bytes(data))
    opened = open_token_store(path)
    assert opened.get_tokens([3]).sum() == 2 * 2 * 8  # the other shard is intact
    with pytest.raises(InputError, match="s.zarr.*'tokens' is corrupt.*checksum"):
        opened.get_tokens([0])
    with pytest.raises(InputError, match="corrupt"):
        list(opened.iter_batches(2))


def test_get_into_a_preallocated_buffer(tmp_path):
    path = tmp_path / "t.zarr"
    d = _build(path)
    s = open_token_store(path)
    buf = np.full((2, *GRID, DIM), np.nan, dtype=np.float32)
    assert s.get("tokens", [5, 1], out=buf) is buf
    np.testing.assert_array_equal(buf, d["tokens"][[5, 1]].astype(np.float16).astype(np.float32))
    labels = np.empty((1, *LHW), dtype=np.int16)
    np.testing.assert_array_equal(s.get("labels", [3], out=labels), d["labels"][[3]])
    with pytest.raises(ConfigError, match=r"out= must be a writeable C-contiguous array of shape \(1, 2, 3, 4\)"):
        s.get("tokens", [0], out=buf)
    with pytest.raises(ConfigError, match="dtype=float16 but out= is float32"):
        s.get("tokens", [0, 1], np.float16, out=buf)

