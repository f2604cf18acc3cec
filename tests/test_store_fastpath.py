"""Token store fast path: byte-identical to zarr-python, checksums on every array, fallback with a reason,
the public reader (open_tokens)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from pipeline.artifacts import seal_manifest
from pipeline.errors import InputError, MissingArtifactError
from stages.store import fastpath, reader, writer
from stages.store import (
    create_token_store,
    fast_path_unsupported_reason,
    open_token_store,
    open_tokens,
    shard_ranges,
    write_shard,
)

N, GRID, DIM, LHW, SHARD = 7, (2, 3), 4, (4, 6), 3
ARRAYS = ("tokens", "tokens_flip", "labels", "rgb", "ids")


def _data(n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d = {
        "tokens": rng.standard_normal((n, *GRID, DIM)).astype(np.float16),
        "tokens_flip": rng.standard_normal((n, *GRID, DIM)).astype(np.float16),
        "labels": np.repeat(rng.integers(-1, 27, (n, 1, LHW[1])), LHW[0], axis=1).astype(np.int16),
        "rgb": rng.integers(0, 256, (n, *LHW, 3)).astype(np.uint8),
        "ids": np.array([f"img{i:03d}" for i in range(n)], dtype=object),
    }
    # fill-value samples: all-zero tokens (and -0.0), an all-ignore label map, an all-black image
    d["tokens"][1] = 0
    d["tokens_flip"][1] = -0.0
    d["labels"][1] = -1
    d["rgb"][1] = 0
    return d


def _create(path: Path, n: int = N) -> zarr.Group:
    return create_token_store(path, n=n, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=True,
                              with_flip=True, attrs={"backbone": "vit_small"})


def _write_all(path: Path, d: dict[str, np.ndarray]) -> None:
    for k, (a, b) in enumerate(shard_ranges(len(d["ids"]), SHARD)):
        write_shard(path, k, tokens=d["tokens"][a:b], tokens_flip=d["tokens_flip"][a:b], labels=d["labels"][a:b],
                    rgb=d["rgb"][a:b], ids=list(d["ids"][a:b]))


def _force_zarr_python(mp: pytest.MonkeyPatch) -> None:
    """Every array refused by the fast path (and no writer cached from before)."""
    for module in (reader, writer):
        mp.setattr(module, "fast_path_unsupported_reason", lambda arr: "forced for the test")
    mp.setattr(writer, "_WRITERS", {})


def _write_with_zarr(path: Path, d: dict[str, np.ndarray], **config: bool) -> None:
    """The reference: zarr-python writes each shard (``config``: its array config)."""
    group = zarr.open_group(str(path), mode="r+")
    for name in ARRAYS:
        arr = group[name].with_config(config) if config else group[name]
        for a, b in shard_ranges(len(d["ids"]), SHARD):
            arr[a:b] = d[name][a:b]


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != "zarr.json"}


def _index(shard_file: Path) -> np.ndarray:
    raw = shard_file.read_bytes()
    return np.frombuffer(raw[-(16 * SHARD + 4):-4], dtype="<u8").reshape(SHARD, 2)


def test_fast_writer_is_byte_identical_to_zarr_python(tmp_path: Path) -> None:
    """Normal shards, the short last shard and fill-value samples: the same bytes as zarr-python writes."""
    d = _data()
    _create(tmp_path / "fast.zarr")
    _write_all(tmp_path / "fast.zarr", d)
    _create(tmp_path / "ref.zarr")
    _write_with_zarr(tmp_path / "ref.zarr", d, write_empty_chunks=True)
    fast, ref = _chunk_files(tmp_path / "fast.zarr"), _chunk_files(tmp_path / "ref.zarr")
    assert sorted(fast) == sorted(ref)
    assert {name.split("/")[0] for name in fast} == set(ARRAYS)
    assert len([f for f in fast if f.startswith("tokens/")]) == 3  # 3 shards, the last one short
    for name in fast:
        assert fast[name] == ref[name], name
    # deliberate: every sample has a stored, checksummed chunk, the fill-value ones too
    index = _index(tmp_path / "fast.zarr" / "tokens" / "c" / "0" / "0" / "0" / "0")
    assert (index[:, 0] != 2**64 - 1).all()
    last = _index(tmp_path / "fast.zarr" / "tokens" / "c" / "2" / "0" / "0" / "0")
    assert last[0, 0] == 0 and (last[1:] == 2**64 - 1).all()  # samples beyond N: empty entries
    # the forced zarr-python fallback of write_shard writes the same bytes too
    _create(tmp_path / "fallback.zarr")
    with pytest.MonkeyPatch.context() as mp:
        _force_zarr_python(mp)
        _write_all(tmp_path / "fallback.zarr", d)
        assert [w.sharded for _, w in writer._WRITERS.values()] == [{}]  # zarr-python wrote it
    assert _chunk_files(tmp_path / "fallback.zarr") == fast


def test_both_readers_agree_bit_for_bit(tmp_path: Path) -> None:
    d = _data()
    path = tmp_path / "t.zarr"
    _create(path)
    _write_all(path, d)
    s = open_token_store(path)
    assert all(reason is None for reason in s.fast_path.values())
    group = zarr.open_group(str(path), mode="r")
    idx = [6, 1, 3, 3, 0]
    for name in ARRAYS[:-1]:
        ours = s.get(name, idx)
        np.testing.assert_array_equal(ours.view(np.uint8), np.asarray(group[name][:])[idx].view(np.uint8))
        np.testing.assert_array_equal(ours.view(np.uint8), d[name][idx].view(np.uint8))
    assert np.signbit(s.get("tokens_flip", [1])).all()  # -0.0 survives
    # float32 reads (cast by table look-up) are numpy's exact cast, subnormals and extremes included
    special = np.array([6e-8, -6e-8, 65504, -65504, -0.0, 1 / 3], dtype=np.float16)
    tokens = d["tokens"].copy()
    tokens.reshape(-1)[: special.size] = special
    write_shard(path, 0, tokens=tokens[:3], tokens_flip=d["tokens_flip"][:3], labels=d["labels"][:3],
                rgb=d["rgb"][:3], ids=list(d["ids"][:3]))
    np.testing.assert_array_equal(s.get_tokens(idx).view(np.uint32), tokens[idx].astype(np.float32).view(np.uint32))
    assert s.ids == list(d["ids"]) == list(group["ids"][:])


def test_index_cache_follows_a_rewritten_shard(tmp_path: Path) -> None:
    d = _data()
    path = tmp_path / "t.zarr"
    _create(path)
    _write_all(path, d)
    s = open_token_store(path)
    s.get_tokens([4])
    write_shard(path, 1, tokens=d["tokens"][3:6] * 2, tokens_flip=d["tokens_flip"][3:6], labels=d["labels"][3:6],
                rgb=d["rgb"][3:6], ids=["x", "y", "z"])
    np.testing.assert_array_equal(s.get("tokens", [4]), d["tokens"][[4]] * 2)


def test_shard_writes_are_atomic_and_clear_stale_temp_files(tmp_path: Path) -> None:
    d = _data()
    path = tmp_path / "t.zarr"
    _create(path)
    _write_all(path, d)
    shard_dir = path / "labels" / "c" / "0" / "0"
    stale = shard_dir / ".0.tmp-99999-1"
    stale.write_bytes(b"half a shard from a killed writer")
    write_shard(path, 0, tokens=d["tokens"][:3], tokens_flip=d["tokens_flip"][:3], labels=d["labels"][:3],
                rgb=d["rgb"][:3], ids=list(d["ids"][:3]))
    assert sorted(p.name for p in shard_dir.iterdir()) == ["0"]
    assert not [p for p in path.rglob("*") if ".tmp-" in p.name]


def _flip_bit(path: Path, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("fallback", [False, True], ids=["fast", "zarr-python"])
@pytest.mark.parametrize("name", ["labels", "rgb", "tokens", "tokens_flip"])
def test_every_bit_flip_fails_the_read_naming_store_array_sample(tmp_path: Path, name: str, fallback: bool) -> None:
    """Single-bit flips anywhere in a shard file (chunks, checksums, index): an InputError, never wrong values."""
    d = _data()
    path = tmp_path / "t.zarr"
    _create(path)
    _write_all(path, d)
    shard_file = path.joinpath(name, "c", "1", *["0"] * (2 if name == "labels" else 3))
    bits = np.random.default_rng(1).choice(shard_file.stat().st_size * 8, size=40, replace=False)
    for bit in [*bits, shard_file.stat().st_size * 8 - 1, 3]:  # the index crc's last bit, the first chunk
        original = _flip_bit(shard_file, int(bit))
        with pytest.MonkeyPatch.context() as mp:
            if fallback:
                _force_zarr_python(mp)
            s = open_token_store(path)
            assert s.get(name, [0]).shape[0] == 1  # another shard is not affected
            with pytest.raises(InputError, match=rf"t\.zarr: array '{name}' is corrupt \((sample|shard|samples)"):
                s.get(name, [3, 4, 5])
        shard_file.write_bytes(original)
    s = open_token_store(path)
    np.testing.assert_array_equal(s.get(name, [3, 4, 5]), d[name][3:6])


def test_fast_errors_name_the_sample_and_a_flipped_ids_chunk_fails(tmp_path: Path) -> None:
    d = _data()
    path = tmp_path / "t.zarr"
    _create(path)
    _write_all(path, d)
    f = path / "tokens" / "c" / "1" / "0" / "0" / "0"
    chunk = 4 * int(np.prod(GRID)) * DIM // 2 + 4  # 2 bytes per fp16 value + crc
    original = _flip_bit(f, 8 * (chunk + 5))  # inside the second chunk of shard 1: sample 4
    with pytest.raises(InputError, match=r"array 'tokens' is corrupt \(sample 4, file .*tokens/c/1/0/0/0: "
                                         r"chunk checksum mismatch\)"):
        open_token_store(path).get_tokens([5, 4])
    store = open_token_store(path)
    for read in (lambda: store.get("tokens", [4]), lambda: store.get_tokens([4]),  # the single-sample path
                 lambda: store.get("tokens", [4], out=np.empty((1, *GRID, DIM), np.float32))):
        with pytest.raises(InputError, match=r"array 'tokens' is corrupt \(sample 4, file .*tokens/c/1/0/0/0: "
                                             r"chunk checksum mismatch\)"):
            read()
    np.testing.assert_array_equal(store.get("tokens", [5]), d["tokens"][[5]])
    f.write_bytes(original)
    np.testing.assert_array_equal(store.get_tokens([4]), d["tokens"][[4]].astype(np.float32))
    _flip_bit(path / "ids" / "c" / "2", 40)
    with pytest.raises(InputError, match=r"t\.zarr: array 'ids' is corrupt \(shard 2, samples \[6, 7\)"):
        open_token_store(path).ids


def test_other_codec_chains_and_stores_fall_back_with_a_reason(tmp_path: Path) -> None:
    d = _data()
    path = tmp_path / "t.zarr"
    group = _create(path)
    del group["rgb"]
    group.create_array("rgb", shape=(N, *LHW, 3), dtype="uint8", chunks=(1, *LHW, 3), shards=(SHARD, *LHW, 3),
                       compressors=ZstdCodec(level=1), fill_value=0)  # no crc32c
    del group["labels"]
    group.create_array("labels", shape=(N, *LHW), dtype="int16", chunks=(1, *LHW), fill_value=-1)  # unsharded
    _write_all(path, d)
    s = open_token_store(path)
    assert s.fast_path["tokens"] is None and s.fast_path["ids"] is None
    assert "not [bytes, (blosc | zstd), crc32c]" in s.fast_path["rgb"]
    assert "not one sharding_indexed codec" in s.fast_path["labels"]
    for name in ("rgb", "labels", "tokens"):
        np.testing.assert_array_equal(s.get(name, [6, 2, 2]), d[name][[6, 2, 2]])
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    arr = memory.create_array("x", shape=(4, 2), dtype="float16", chunks=(1, 2), shards=(2, 2))
    assert "not a local directory" in fast_path_unsupported_reason(arr)


def test_reads_do_no_metadata_lookups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays are opened once, at open: a read never goes back to the group."""
    d = _data()
    path = tmp_path / "t.zarr"
    _create(path)
    _write_all(path, d)
    s = open_token_store(path)
    s.ids  # noqa: B018 - cached on first use

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("metadata look-up during a read")

    for method in ("__getitem__", "__contains__", "arrays", "attrs"):
        monkeypatch.setattr(zarr.Group, method, boom)
    monkeypatch.setattr(zarr, "open_array", boom)
    assert s.get_tokens([2, 5]).shape == (2, *GRID, DIM) and s.arrays == ARRAYS and s.n == N
    assert sum(len(b["index"]) for b in s.iter_batches(2, arrays=("tokens", "labels", "rgb"))) == N


@pytest.mark.parametrize("fallback", [False, True], ids=["fast", "zarr-python"])
def test_non_finite_tokens_name_stage_artifact_store_and_sample(tmp_path: Path, fallback: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = _data()
    path = tmp_path / ".staging" / "extract-0123456789abcdef" / "tokens.zarr"
    _create(path)
    if fallback:
        _force_zarr_python(monkeypatch)
    bad = d["tokens"][3:6].astype(np.float32)
    bad[1, 0, 1, 2] = np.nan
    bad[2, 1, 1, 1] = np.inf
    with pytest.raises(InputError) as exc:
        write_shard(path, 1, tokens=bad, tokens_flip=d["tokens_flip"][3:6], labels=d["labels"][3:6],
                    rgb=d["rgb"][3:6], ids=["a", "b", "c"])
    message = str(exc.value)
    assert message.startswith("extract stage, artifact extract-0123456789abcdef: token store ")
    assert str(path) in message and "shard 1 (samples 3..5)" in message
    assert "sample 'b' (index 4) (and 1 more samples) has 1 non-finite values in 'tokens'" in message
    assert not (path / "tokens" / "c" / "1").exists()


def test_float16_non_finite_check_by_bits() -> None:
    finite = np.array([0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 1.0, -2.5], dtype=np.float16)
    assert not fastpath._has_non_finite(finite)
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        x = finite.copy()
        x[3] = bad
        assert fastpath._has_non_finite(x), bad
    negative_nan = np.array([0x7E00 | 0x8000], dtype=np.uint16).view(np.float16)
    assert np.isnan(negative_nan).all() and fastpath._has_non_finite(negative_nan)


def _publish_fake_tokens_artifact(root: Path, artifact: str) -> Path:
    folder = root / "extract" / artifact
    _create(folder / "tokens.zarr", n=N)
    _write_all(folder / "tokens.zarr", _data())
    (folder / "manifest.json").write_text(json.dumps(seal_manifest({"id": artifact, "stage": "extract"})))
    return folder


def test_open_tokens_by_id_prefix_path_and_read_by_sample_id(root: Path, tmp_path: Path) -> None:
    d = _data()
    folder = _publish_fake_tokens_artifact(root, "extract-0123456789abcdef")
    for ref in ("extract-0123456789abcdef", "extract-0123", folder, folder / "tokens.zarr"):
        t = open_tokens(ref)
        assert t.n == N and t.attrs == {"backbone": "vit_small"}
    assert open_tokens("extract-01", root=root).path == str(folder / "tokens.zarr")
    t = open_tokens("extract-0123")
    np.testing.assert_array_equal(t.index_of(["img005", "img002"]), [5, 2])
    np.testing.assert_array_equal(t.get_labels(t.index_of("img004")), d["labels"][[4]])
    s = t.sample("img006")
    assert s["id"] == "img006" and s["index"] == 6 and s["tokens"].dtype == np.float32
    np.testing.assert_array_equal(s["tokens"], d["tokens"][6].astype(np.float32))
    np.testing.assert_array_equal(s["rgb"], d["rgb"][6])
    assert t.sample(6)["id"] == "img006"
    with pytest.raises(InputError, match="no sample with id 'nope'"):
        t.index_of(["img001", "nope"])
    with pytest.raises(MissingArtifactError, match="no artifact matches 'extract-ffff'"):
        open_tokens("extract-ffff")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a token store nor an artifact folder"):
        open_tokens(tmp_path / "empty")


def test_old_format_version_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    _create(path)
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["stegopipe"], version=1)
    group.attrs["stegopipe"] = meta
    with pytest.raises(InputError, match="format version 1 unsupported .*re-run the stage"):
        open_token_store(path)


def test_readme_notebook_example_runs(root: Path) -> None:
    """The README's "Reading the cache from a notebook" example, run as written against a tokens artifact."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Reading the cache from a notebook", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in code.splitlines() if "://" not in line)  # URLs: tests/test_s3*.py
    folder = _publish_fake_tokens_artifact(root, "extract-0123456789abcdef")
    group = zarr.open_group(str(folder / "tokens.zarr"), mode="r+")
    group.attrs["split"] = "val"
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["x"].shape == (2, *GRID, DIM) and namespace["s"]["id"] == "img000"
    np.testing.assert_array_equal(namespace["y"], _data()["labels"][[0]])
