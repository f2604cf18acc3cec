"""Token store readers against damaged and crafted files (issue 19): a missing shard or chunk, an empty
index entry, an index that aliases samples or overflows, decompression bombs, metadata claiming absurd
sizes. Each read returns the original data or raises one InputError line naming the store and what is
wrong; never fill values, another sample's data, a raw exception or gigabytes of memory."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import zarr

from pipeline.errors import InputError
from stages.store import create_token_store, open_token_store, open_tokens, shard_ranges, write_shard
from stages.store import reader as store_reader

N, GRID, DIM, LHW, SHARD = 7, (2, 3), 4, (4, 6), 3
EMPTY = 2**64 - 1
PATHS = ("fast", "zarr-python")


@pytest.fixture(params=PATHS)
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both readers: the direct shard reader, and zarr-python (the fallback for other codec chains)."""
    if request.param == "zarr-python":
        monkeypatch.setattr(store_reader, "fast_path_unsupported_reason", lambda arr: "forced for the test")
    return request.param


def _data(label_hw: tuple[int, int] = LHW) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.standard_normal((N, *GRID, DIM)).astype(np.float16),
        "labels": rng.integers(-1, 27, (N, *label_hw)).astype(np.int16),
        "rgb": rng.integers(0, 256, (N, *label_hw, 3)).astype(np.uint8),
        "ids": [f"img{i:03d}" for i in range(N)],
    }


def _build(path: Path, label_hw: tuple[int, int] = LHW) -> dict[str, np.ndarray]:
    d = _data(label_hw)
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=label_hw, shard_size=SHARD, with_rgb=True,
                       with_flip=False)
    for k, (a, b) in enumerate(shard_ranges(N, SHARD)):
        write_shard(path, k, tokens=d["tokens"][a:b], labels=d["labels"][a:b], rgb=d["rgb"][a:b],
                    ids=d["ids"][a:b])
    return d


def _shard_file(path: Path, name: str, shard: int) -> Path:
    return path.joinpath(name, "c", str(shard), *["0"] * (2 if name == "labels" else 3))


def _crc(data: bytes) -> bytes:
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def _split_shard(f: Path) -> tuple[list[bytes | None], np.ndarray]:
    """The stored chunks (payload + crc, None where empty) and the index of a shard file."""
    raw = f.read_bytes()
    index = np.frombuffer(raw[-(16 * SHARD + 4):-4], dtype="<u8").reshape(SHARD, 2).copy()
    chunks = [None if o == EMPTY else raw[int(o):int(o + n)] for o, n in index]
    return chunks, index


def _write_shard_file(f: Path, chunks: list[bytes | None], index: np.ndarray | None = None) -> None:
    """A shard file of ``chunks`` back to back and ``index`` (default: theirs), its crc32c recomputed."""
    data, offsets = b"", np.full((SHARD, 2), EMPTY, dtype="<u8")
    for j, chunk in enumerate(chunks):
        if chunk is not None:
            offsets[j] = (len(data), len(chunk))
            data += chunk
    index_bytes = (offsets if index is None else index).astype("<u8").tobytes()
    f.write_bytes(data + index_bytes + _crc(index_bytes))


def test_a_missing_shard_file_is_named_never_read_as_fill_values(tmp_path: Path, read_path: str) -> None:
    path = tmp_path / "t.zarr"
    d = _build(path)
    _shard_file(path, "labels", 1).unlink()
    t = open_tokens(path)
    np.testing.assert_array_equal(t.get_labels([0, 6]), d["labels"][[0, 6]])  # other shards read
    with pytest.raises(InputError, match=r"t\.zarr: array 'labels' is incomplete \(sample 4, file .*labels/c/1/0/0: "
                                         r"shard file missing\)"):
        t.get_labels([4])


def test_a_missing_ids_chunk_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    (path / "ids" / "c" / "1").unlink()
    with pytest.raises(InputError, match=r"array 'ids' is incomplete \(sample 3, file .*ids/c/1: chunk file missing"):
        open_tokens(path).ids  # noqa: B018


def test_an_empty_index_entry_is_named_never_read_as_fill_values(tmp_path: Path, read_path: str) -> None:
    path = tmp_path / "t.zarr"
    d = _build(path)
    for name in ("tokens", "rgb"):
        f = _shard_file(path, name, 0)
        chunks, _ = _split_shard(f)
        _write_shard_file(f, [chunks[0], None, chunks[2]])  # sample 1 dropped, as zarr's default write does
    t = open_tokens(path)
    np.testing.assert_array_equal(t.get("tokens", [3]), d["tokens"][[3]])
    for name in ("tokens", "rgb"):
        with pytest.raises(InputError, match=rf"array '{name}' is incomplete \(sample 1, file .*{name}/c/0/0/0/0: "
                                             r"empty shard index entry: no chunk stored\)"):
            t.get(name, [1, 2])


def test_zarr_default_write_skipping_fill_chunks_is_an_incomplete_store(tmp_path: Path, read_path: str) -> None:
    """zarr-python's default write stores no chunk for a fill-value sample; our stores always write every
    sample, so such a store is refused when the sample is read (never read as fill values)."""
    path = tmp_path / "t.zarr"
    d = _data()
    d["tokens"][1] = 0
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=False,
                       with_flip=False)
    group = zarr.open_group(str(path), mode="r+")
    group["tokens"][:] = d["tokens"]
    group["labels"][:] = d["labels"]
    group["ids"][:] = np.array(d["ids"], dtype=object)
    t = open_token_store(path)
    np.testing.assert_array_equal(t.get("tokens", [0, 2]), d["tokens"][[0, 2]])
    with pytest.raises(InputError, match=r"array 'tokens' is incomplete \(sample 1, .*empty shard index entry"):
        t.get_tokens([1])


@pytest.mark.parametrize("name", ["tokens", "rgb"])
def test_a_crafted_index_aliasing_two_samples_is_refused(tmp_path: Path, read_path: str, name: str) -> None:
    """Sample 1 pointed at sample 0's chunk (index crc32c fixed): the shard is refused, never sample 0's data."""
    path = tmp_path / "t.zarr"
    d = _build(path)
    f = _shard_file(path, name, 0)
    chunks, index = _split_shard(f)
    index[1] = index[0]
    _write_shard_file(f, chunks, index)
    t = open_tokens(path)
    with pytest.raises(InputError, match=rf"array '{name}' is corrupt \(shard 0, file .*: shard index entry 1: "
                                         r"chunk overlaps the chunk of entry 0 \(aliased samples\)\)"):
        t.get(name, [1])
    np.testing.assert_array_equal(t.get(name, [4]), d[name][[4]])


def test_a_raw_chunk_of_another_length_is_refused_at_the_index(tmp_path: Path, read_path: str) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    f = _shard_file(path, "tokens", 0)
    chunks, _ = _split_shard(f)
    short = chunks[1][:8]
    _write_shard_file(f, [chunks[0], short + _crc(short), chunks[2]])
    with pytest.raises(InputError, match=r"shard index entry 1: chunk length 12 is not in \[52, 52\]"):
        open_tokens(path).get_tokens([0])


@pytest.mark.parametrize("offset", [2**63, EMPTY - 3, 2**64 - 2])
def test_an_index_overflowing_uint64_is_refused(tmp_path: Path, read_path: str, offset: int) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    f = _shard_file(path, "tokens", 1)
    chunks, index = _split_shard(f)
    index[2] = (offset, 2**63 + 10)
    _write_shard_file(f, chunks, index)
    with pytest.raises(InputError, match=r"array 'tokens' is corrupt \(shard 1, file .*: shard index entry 2: chunk "):
        open_tokens(path).get_tokens([5])


def _bomb(codec: numcodecs.abc.Codec, nbytes: int) -> bytes:
    payload = codec.encode(np.zeros(nbytes, dtype=np.uint8))
    return payload + _crc(payload)


@pytest.mark.parametrize(("name", "codec"), [
    ("rgb", numcodecs.Zstd(level=1)),
    ("labels", numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE, typesize=2)),
])
def test_a_decompression_bomb_with_a_valid_crc_allocates_nothing_big(tmp_path: Path, read_path: str, name: str,
                                                                      codec: numcodecs.abc.Codec) -> None:
    """A chunk of a 512×512 sample's size declaring 64 MiB (crc32c valid): refused before decoding, without
    allocating it; a longer chunk than any encoding of a sample is refused at the shard index already."""
    path = tmp_path / "t.zarr"
    d = _build(path, label_hw=(512, 512))
    f = _shard_file(path, name, 0)
    chunks, _ = _split_shard(f)
    bomb = _bomb(codec, 64 << 20)
    assert len(bomb) < d[name][0].nbytes
    _write_shard_file(f, [chunks[0], bomb, chunks[2]])
    t = open_tokens(path)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=rf"array '{name}' is corrupt \(sample 1, file .*: "
                                             rf"{codec.codec_id} header declares {64 << 20} bytes, expected"):
            t.get(name, [1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    np.testing.assert_array_equal(t.get(name, [0, 2]), d[name][[0, 2]])
    junk = bytes(d[name][0].nbytes * 2)  # longer than any blosc or zstd encoding of one sample
    _write_shard_file(f, [chunks[0], junk + _crc(junk), chunks[2]])
    with pytest.raises(InputError, match=r"shard index entry 1: chunk length \d+ is not in \[\d+, \d+\]"):
        open_tokens(path).get(name, [0])


def test_a_zstd_frame_without_declared_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    d = _build(path)
    f = _shard_file(path, "rgb", 0)
    chunks, _ = _split_shard(f)
    payload = chunks[1][:-4]
    crafted = payload[:4] + b"\x00" + payload[5:]  # frame descriptor: no content size
    _write_shard_file(f, [chunks[0], crafted + _crc(crafted), chunks[2]])
    t = open_tokens(path)
    with pytest.raises(InputError, match=r"zstd header declares no decoded size"):
        t.get_rgb([1])
    np.testing.assert_array_equal(t.get_rgb([0, 2]), d["rgb"][[0, 2]])


def _edit_json(f: Path, edit: object) -> None:
    meta = json.loads(f.read_text())
    edit(meta)
    f.write_text(json.dumps(meta))


def test_metadata_claiming_1e15_samples_is_refused(tmp_path: Path, read_path: str) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    for name in ("tokens", "labels", "rgb", "ids"):
        _edit_json(path / name / "zarr.json", lambda m: m["shape"].__setitem__(0, 10**15))
    t = open_tokens(path)
    assert t.n == 10**15
    with pytest.raises(InputError, match=r"array 'ids' is incomplete \(sample 9, file .*ids/c/3: chunk file missing"):
        t.ids  # noqa: B018
    with pytest.raises(InputError, match=r"array 'tokens' is incomplete \(sample 7, .*empty shard index entry"):
        list(t.iter_batches(64))
    with pytest.raises(InputError, match=r"array 'tokens' is incomplete \(sample 10000000000000, "):
        t.get_tokens([10**13])


def test_metadata_claiming_a_huge_chunk_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    big = [10**6, 10**6]

    def labels(m: dict) -> None:
        m["shape"][1:] = big
        m["chunk_grid"]["configuration"]["chunk_shape"][1:] = big
        m["codecs"][0]["configuration"]["chunk_shape"][1:] = big

    _edit_json(path / "labels" / "zarr.json", labels)
    _edit_json(path / "zarr.json", lambda m: m["attributes"]["stegopipe"].__setitem__("label_hw", big))
    with pytest.raises(InputError, match=r"gives labels samples of 2000000000000 bytes, more than the 1024 MiB"):
        open_tokens(path)


@pytest.mark.parametrize("value", ["abc", [2], [2, -3], [2.5, 3], None])
def test_malformed_store_metadata_is_one_error_line(tmp_path: Path, value: object) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    _edit_json(path / "zarr.json", lambda m: m["attributes"]["stegopipe"].__setitem__("grid", value))
    with pytest.raises(InputError, match=r"metadata 'stegopipe'\.grid is .*, expected 2 positive integers"):
        open_tokens(path)


def test_a_malformed_array_zarr_json_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    _build(path)
    _edit_json(path / "rgb" / "zarr.json", lambda m: m.__setitem__("codecs", [{"name": "no-such-codec"}]))
    with pytest.raises(InputError, match=r"t\.zarr: an array's zarr\.json is malformed") as exc:
        open_tokens(path)
    assert "\n" not in str(exc.value)


def test_a_damaged_array_zarr_json_never_makes_the_array_look_absent(tmp_path: Path) -> None:
    """Without this, a store whose rgb metadata is damaged would open as a store without rgb."""
    path = tmp_path / "t.zarr"
    _build(path)
    f = path / "rgb" / "zarr.json"
    f.write_text(f.read_text().replace('"zarr_format"', '"zarr_fo#mat"'))
    with pytest.raises(InputError, match=r"t\.zarr: rgb/zarr\.json is not the metadata of a Zarr v3 array"):
        open_tokens(path)
