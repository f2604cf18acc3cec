"""Squirrel interop: stego-studies sample schema, round trip through a MessagepackDriver store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from squirrel.driver import MessagepackDriver

from pipeline.errors import InputError
from stages.store.squirrel import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize_img,
    export_squirrel,
    import_squirrel,
    normalize_rgb,
)
from stages.store import create_token_store, open_token_store, shard_ranges, write_shard

N, GRID, DIM, R = 7, (2, 2), 5, 8


def _store(path: Path, *, with_rgb: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d = {
        "tokens": rng.standard_normal((N, *GRID, DIM)).astype(np.float32),
        "labels": rng.integers(-1, 27, (N, R, R)),
        "rgb": rng.integers(0, 256, (N, R, R, 3)).astype(np.uint8),
    }
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=(R, R), shard_size=4, with_rgb=with_rgb,
                       with_flip=False, attrs={"dataset": "toy"})
    for k, (a, b) in enumerate(shard_ranges(N, 4)):
        write_shard(path, k, tokens=d["tokens"][a:b], labels=d["labels"][a:b],
                    rgb=d["rgb"][a:b] if with_rgb else None, ids=[f"im{i}" for i in range(a, b)])
    return d


def test_normalisation_roundtrip():
    rgb = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    img = normalize_rgb(rgb)
    assert img.shape == (1, 3, 16, 16) and img.dtype == np.float32
    np.testing.assert_allclose(img[0, :, 0, 0], -IMAGENET_MEAN / IMAGENET_STD, rtol=1e-6)
    np.testing.assert_array_equal(denormalize_img(img), rgb)


def test_export_schema(tmp_path):
    src = tmp_path / "t.zarr"
    d = _store(src, with_rgb=True)
    url = str(tmp_path / "sq")
    res = export_squirrel(src, url, shard_size=3)
    assert (res.n, res.shards, res.notes) == (N, 3, [])
    assert (Path(url) / "status.txt").read_text() == "SUCCESS"
    driver = MessagepackDriver(url)
    assert sorted(driver.keys()) == ["000000", "000001", "000002"]
    samples = list(driver.store.get("000001"))
    assert len(samples) == 3
    s = samples[0]
    assert set(s) == {"ind", "img", "label", "dino_feats"}
    assert s["ind"].dtype == np.int64 and s["ind"].tolist() == [3]
    assert s["img"].dtype == np.float32 and s["img"].shape == (1, 3, R, R)
    assert s["label"].dtype == np.int64 and s["label"].shape == (1, R, R)
    assert s["dino_feats"].dtype == np.float32 and s["dino_feats"].shape == (1, DIM, *GRID)
    np.testing.assert_array_equal(s["label"][0], d["labels"][3])
    np.testing.assert_array_equal(s["dino_feats"][0], d["tokens"][3].astype(np.float16).astype(np.float32)
                                  .transpose(2, 0, 1))
    np.testing.assert_allclose(s["img"], normalize_rgb(d["rgb"][3:4]))
    # the stream API stego-studies reads with
    assert [int(x["ind"][0]) for x in driver.get_iter(keys_iterable=sorted(driver.keys()))] == list(range(N))
    with pytest.raises(InputError, match="not empty"):
        export_squirrel(src, url)


def test_roundtrip(tmp_path):
    src = tmp_path / "t.zarr"
    d = _store(src, with_rgb=True)
    url = str(tmp_path / "sq")
    export_squirrel(src, url, shard_size=3)
    dest = tmp_path / "back.zarr"
    import_squirrel(url, dest, shard_size=5)
    s = open_token_store(dest)
    assert (s.n, s.grid, s.dim, s.label_hw, s.shard_size) == (N, GRID, DIM, (R, R), 5)
    assert s.ids == [f"im{i}" for i in range(N)]
    assert s.attrs["dataset"] == "toy" and s.attrs["imported_from"] == url
    np.testing.assert_array_equal(s.get_tokens(range(N)), d["tokens"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(s.get_labels(range(N)), d["labels"])
    np.testing.assert_array_equal(s.get_rgb(range(N)), d["rgb"])


def test_export_without_rgb_notes_zeros(tmp_path):
    src = tmp_path / "t.zarr"
    _store(src, with_rgb=False)
    url = str(tmp_path / "sq")
    res = export_squirrel(src, url)
    assert res.shards == 1 and len(res.notes) == 1 and "zeros" in res.notes[0]
    sample = next(iter(MessagepackDriver(url).store.get("000000")))
    assert (sample["img"] == 0).all()
    dest = tmp_path / "back.zarr"
    import_squirrel(url, dest, shard_size=4)
    assert not open_token_store(dest).has_rgb  # zeros are not turned into a fake image


def _foreign_store(url: str, inds: list[int], *, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A store as stego-studies wrote it: random shard keys, shuffled ``ind``, no sidecar."""
    samples = [
        {
            "ind": np.array([i], dtype=np.int64),
            "img": normalize_rgb(rng.integers(0, 256, (1, R, R, 3)).astype(np.uint8)),
            "label": rng.integers(-1, 3, (1, R, R)).astype(np.int64),
            "dino_feats": rng.standard_normal((1, DIM, *GRID)).astype(np.float32),
        }
        for i in inds
    ]
    driver = MessagepackDriver(url)
    driver.store.set(samples[:3], key="b7f3")
    driver.store.set(samples[3:], key="a1c9")
    Path(url, "status.txt").write_text("SUCCESS")
    return samples


def test_import_foreign_store(tmp_path):
    url = str(tmp_path / "mxm")
    samples = _foreign_store(url, [4, 0, 2, 1, 3], rng=np.random.default_rng(1))
    dest = tmp_path / "t.zarr"
    import_squirrel(url, dest, shard_size=2)
    s = open_token_store(dest)
    order = [3, 4, 0, 1, 2]  # key "a1c9" sorts before "b7f3"; record order kept inside a shard
    assert s.ids == [str(int(samples[j]["ind"][0])) for j in order] == ["1", "3", "4", "0", "2"]
    feats = np.stack([samples[j]["dino_feats"][0].transpose(1, 2, 0) for j in order])
    np.testing.assert_array_equal(s.get_tokens(range(5)), feats.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(s.get_labels(range(5)), np.stack([samples[j]["label"][0] for j in order]))
    np.testing.assert_array_equal(s.get_rgb([0]), denormalize_img(samples[3]["img"]))


def test_import_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        import_squirrel(str(tmp_path / "nope"), tmp_path / "a.zarr")
    url = str(tmp_path / "partial")
    _foreign_store(url, [0, 1, 2, 3], rng=np.random.default_rng(2))
    Path(url, "status.txt").write_text("WRITING")
    with pytest.raises(InputError, match="WRITING"):
        import_squirrel(url, tmp_path / "b.zarr")
    url = str(tmp_path / "bad")
    MessagepackDriver(url).store.set([{"ind": np.array([0]), "label": np.zeros((1, R, R), np.int64)}], key="k")
    with pytest.raises(InputError, match="lacks 'dino_feats'"):
        import_squirrel(url, tmp_path / "c.zarr")
    url = str(tmp_path / "mixed")
    good = {"ind": np.array([0]), "label": np.zeros((1, R, R), np.int64),
            "dino_feats": np.zeros((1, DIM, *GRID), np.float32)}
    MessagepackDriver(url).store.set([good, {**good, "dino_feats": np.zeros((1, DIM + 1, *GRID), np.float32)}],
                                     key="k")
    with pytest.raises(InputError, match="record 1"):
        import_squirrel(url, tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()  # the half-built store was removed
    (tmp_path / "e.zarr").mkdir()
    with pytest.raises(InputError, match="already exists"):
        import_squirrel(str(tmp_path / "partial"), tmp_path / "e.zarr")


# --------------------------------------------------------------------------------------------------
# untrusted shards: reading never unpickles, and checks dtype, shape and buffer length first
# --------------------------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code in a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (self.marker, "w")


def _raw_shard(url: Path, records: list[dict], key: str = "k") -> Path:
    """A Squirrel shard written byte by byte (records are msgpack maps, arrays as msgpack-numpy maps)."""
    import gzip

    import msgpack

    url.mkdir(parents=True, exist_ok=True)
    (url / "status.txt").write_text("SUCCESS")
    with gzip.open(url / f"{key}.gz", "wb") as handle:
        for record in records:
            handle.write(msgpack.packb(record, use_bin_type=True))
    return url / f"{key}.gz"


def _nd(dtype: str, shape: tuple[int, ...], data: bytes, kind: bytes = b"") -> dict:
    return {b"nd": True, b"type": dtype, b"kind": kind, b"shape": shape, b"data": data}


def _good_record() -> dict:
    label, feats = np.zeros((1, R, R), np.int64), np.zeros((1, DIM, *GRID), np.float32)
    return {"ind": _nd("<i8", (1,), np.array([0], np.int64).tobytes()),
            "label": _nd("<i8", label.shape, label.tobytes()),
            "dino_feats": _nd("<f4", feats.shape, feats.tobytes())}


def test_import_never_unpickles_an_object_array(tmp_path: Path, root: Path) -> None:
    import pickle

    from click.testing import CliRunner

    from pipeline.cli import main

    marker = tmp_path / "pwned"
    evil = _nd("|O", (1,), pickle.dumps(_WritesMarker(str(marker))), kind=b"O")
    url = tmp_path / "evil"
    shard = _raw_shard(url, [_good_record(), {**_good_record(), "ind": evil}])
    result = CliRunner().invoke(main, ["import-squirrel", str(url)])
    assert result.exit_code == 2, result.output
    assert not marker.exists()  # the pickle never ran
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    line = errors[0]
    assert str(shard) in line and "record 1" in line and "refused" in line
    assert not list(root.glob("extract/*"))  # nothing published


@pytest.mark.parametrize(("array", "message"), [
    (_nd("<U3", (1,), "abc".encode("utf-32-le")), "refused"),  # not numeric
    (_nd([["a", "<f4"]], (1,), b"\0" * 4, kind=b"V"), "refused"),  # structured
    (_nd("V4", (1,), b"\0" * 4), "refused"),  # void
    (_nd("<f4", (1, DIM, *GRID), b"\0" * 8), "needs 80 bytes, its buffer holds 8"),  # truncated buffer
    (_nd("<f4", (1, 2**40, 2**40, 2**40), b"\0" * 16), "buffer holds 16"),  # huge claimed shape
    (_nd("<f4", (1, -4, 2, 2), b""), "non-negative"),
])
def test_bad_arrays_name_the_shard_and_record(tmp_path: Path, array: dict, message: str) -> None:
    url = tmp_path / "bad"
    shard = _raw_shard(url, [_good_record(), _good_record(), {**_good_record(), "dino_feats": array}])
    with pytest.raises(InputError, match=message) as info:
        import_squirrel(str(url), tmp_path / "t.zarr")
    assert str(shard) in str(info.value) and "record 2" in str(info.value)
    assert not (tmp_path / "t.zarr").exists()


def test_truncated_shard_file_names_the_record(tmp_path: Path) -> None:
    url = tmp_path / "cut"
    shard = _raw_shard(url, [_good_record(), _good_record()])
    import gzip

    raw = gzip.decompress(shard.read_bytes())
    shard.write_bytes(gzip.compress(raw[: len(raw) * 3 // 4]))  # the second record ends early
    with pytest.raises(InputError, match="record 1") as info:
        import_squirrel(str(url), tmp_path / "t.zarr")
    assert str(shard) in str(info.value)
    shard.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="record 0"):
        import_squirrel(str(url), tmp_path / "u.zarr")


def test_records_must_hold_numeric_arrays(tmp_path: Path) -> None:
    url = tmp_path / "odd"
    scalar = {b"nd": False, b"type": "<i8", b"data": np.int64(3).tobytes()}
    _raw_shard(url, [{**_good_record(), "ind": scalar}])
    with pytest.raises(InputError, match="record 0: 'ind' is a int64, expected a bool, integer or float array"):
        import_squirrel(str(url), tmp_path / "t.zarr")
    _raw_shard(url, [{**_good_record(), "label": "cat"}])
    with pytest.raises(InputError, match="'label' is a str"):
        import_squirrel(str(url), tmp_path / "u.zarr")
    complex_feats = np.zeros((1, DIM, *GRID), np.complex64)
    _raw_shard(url, [{**_good_record(), "dino_feats": _nd("<c8", complex_feats.shape, complex_feats.tobytes())}])
    with pytest.raises(InputError, match="'dino_feats' is a complex64 array"):
        import_squirrel(str(url), tmp_path / "v.zarr")


def test_a_record_over_the_buffer_limit_names_the_limit_and_record(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 item 6: msgpack's BufferFull carries no message; the error says what the limit is."""
    import stages.store.squirrel as squirrel

    monkeypatch.setattr(squirrel, "MAX_RECORD_BYTES", 1 << 20)
    big = np.zeros((1, DIM, 256, 256), np.float32)  # 1.3 MB
    url = tmp_path / "big"
    shard = _raw_shard(url, [_good_record(), {**_good_record(), "dino_feats": _nd("<f4", big.shape, big.tobytes())}])
    with pytest.raises(InputError) as info:
        import_squirrel(str(url), tmp_path / "t.zarr")
    message = str(info.value)
    assert str(shard) in message and "record 1" in message and "larger than 1 MiB" in message
    assert "\n" not in message
