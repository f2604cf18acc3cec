"""Token store: a Zarr v3 group of frozen-backbone tokens, sharded for few files and chunked per sample.

Layout (``N`` samples, token grid ``h×w``, token dim ``D``, label size ``H×W``)::

    tokens[N,h,w,D]       float16  chunk (1,h,w,D), shard (S,h,w,D)   raw + crc32c
    tokens_flip[N,h,w,D]  float16  same (optional: tokens of the horizontally flipped image)
    labels[N,H,W]         int16    chunk (1,H,W),   shard (S,H,W)     blosc lz4 + byte shuffle, crc32c; -1 = ignore
    rgb[N,H,W,3]          uint8    chunk (1,H,W,3), shard (S,H,W,3)   zstd level 1, crc32c (optional)
    ids[N]                string   chunk (S,)                          vlen UTF-8, crc32c

Every chunk of every array ends in a crc32c, and so does every shard index: a flipped bit fails the read
with an :class:`InputError` naming the store, the array and the sample (or shard), never wrong numbers.

One chunk is one sample, so random access (kNN partners, training batches) decodes only the samples it
asks for; one shard file holds ``S`` samples, so a store of 250k samples is a few hundred files per
array. Shard ``k`` covers samples ``[k*S, min((k+1)*S, N))`` in every array (``ids`` included), so shards
are independent write tasks that never touch the same file.

Fast path: for exactly this codec chain on a local directory, shards are read and written directly
(:class:`_ShardFile`): a read is one ``pread``/``preadv`` per run of requested samples at the offsets of the
shard index (cached per shard file, its crc32c checked), a write is one ``writev`` of the whole shard to a
temporary file renamed into place (atomic: a killed write leaves the old file or none). The bytes are
exactly zarr-python's with ``write_empty_chunks=True``: every sample has a stored, checksummed chunk,
an all-zero sample too (zarr's default would store none and read the fill value); zarr-python stays
the reference reader and the fallback for any other codec chain or store (:func:`fast_path_unsupported_reason`).
An empty index entry (a chunk zarr-python skipped as equal to the fill value) reads as the fill value.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import re
import threading
from collections.abc import Iterator, Sequence
from functools import cache, cached_property
from math import prod
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from numpy.typing import ArrayLike, DTypeLike
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, VLenUTF8Codec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.sync import sync
from zarr.storage import LocalStore

from pipeline.artifacts import ArtifactView
from pipeline.errors import ConfigError, InputError
from pipeline.prefetch import prefetch

FORMAT_NAME = "stegopipe.tokens"
FORMAT_VERSION = 2
"""2: a crc32c on every chunk of labels, rgb and ids too; every sample's chunk is stored."""
_META_KEY = "stegopipe"
_SAMPLE_ARRAYS = ("tokens", "tokens_flip", "labels", "rgb", "ids")
_WRITE_CONFIG = {"write_empty_chunks": True}
"""zarr-python writes every chunk, as the fast path does (identical bytes, a checksum for every sample)."""
_EMPTY = 2**64 - 1
"""Offset and length of an empty shard index entry (no chunk stored)."""
_RUN_BYTES = 1 << 20
"""Raw chunks are read about this many bytes per ``preadv`` and checksummed (and cast) while in cache."""
_IOV_MAX = 1000  # below every platform's IOV_MAX (1024 on Linux)
_TMP = ".tmp-"
TOKENS_STORE = "tokens.zarr"
"""The token store's folder name inside a tokens artifact."""
_ARTIFACT_DIR = re.compile(r"^(?P<stage>[a-z][a-z0-9_-]*)-[0-9a-f]{16}$")

StoreLike = str | os.PathLike[str] | zarr.Group


def _read_runs(arr: zarr.Array, runs: list[tuple[int, int]]) -> list[np.ndarray]:
    """Read sample runs ``[a, b)`` concurrently on zarr's event loop (faster than one blocking read
    per run for random batches; bench_store measures it). Uses zarr 3.1's ``Array._async_array`` (pinned version)."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*(arr._async_array.getitem((slice(a, b),)) for a, b in runs))

    return [np.asarray(part) for part in sync(gather())]


def _compressors(name: str) -> tuple[Any, ...]:
    """Per-array codecs after the bytes step, crc32c last. Float16 tokens compress ×1.07 with zstd-1 at a
    third of the write speed, so they are stored raw; labels (blocky) compress ×50 with lz4 + shuffle;
    images with zstd-1; ids (vlen UTF-8) raw."""
    if name == "labels":
        return (BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec())
    if name == "rgb":
        return (ZstdCodec(level=1), Crc32cCodec())
    return (Crc32cCodec(),)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Half-open sample ranges ``[(start, stop), ...]`` of the shards of an ``n``-sample store."""
    if n < 0:
        raise ConfigError(f"store size n={n} is invalid: must be >= 0")
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size} is invalid: must be a positive integer")
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def create_token_store(
    path: str | os.PathLike[str],
    *,
    n: int,
    grid: tuple[int, int],
    dim: int,
    label_hw: tuple[int, int],
    shard_size: int,
    with_rgb: bool,
    with_flip: bool,
    attrs: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create an empty token store at ``path`` (which must not exist) and return its group (writable).

    ``attrs`` (JSON-serialisable, e.g. backbone, resolution, split) are stored as group attributes;
    the key ``"stegopipe"`` is reserved for the store's own metadata.
    """
    h, w = (int(v) for v in grid)
    H, W = (int(v) for v in label_hw)
    for key, value in (("n", n), ("dim", dim), ("grid", h), ("grid", w), ("label_hw", H), ("label_hw", W)):
        if int(value) < (0 if key == "n" else 1):
            raise ConfigError(f"token store {key}={value} is invalid: must be a positive integer")
    shard_ranges(n, shard_size)  # validates shard_size
    user_attrs = dict(attrs or {})
    if _META_KEY in user_attrs:
        raise ConfigError(f"token store attrs key {_META_KEY!r} is reserved; use another name")
    if Path(path).exists():
        raise InputError(f"token store {path}: path already exists; remove it or choose a new path")
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shard_size": int(shard_size),
        "grid": [h, w],
        "dim": int(dim),
        "label_hw": [H, W],
    }
    group = zarr.open_group(str(path), mode="w-", attributes={_META_KEY: meta, **user_attrs})
    s = int(shard_size)
    tok_chunk = (1, h, w, int(dim))
    for name in ("tokens", "tokens_flip") if with_flip else ("tokens",):
        group.create_array(
            name, shape=(n, h, w, dim), dtype="float16", chunks=tok_chunk, shards=(s, *tok_chunk[1:]),
            compressors=_compressors(name), fill_value=0.0,
        )
    group.create_array(
        "labels", shape=(n, H, W), dtype="int16", chunks=(1, H, W), shards=(s, H, W),
        compressors=_compressors("labels"), fill_value=-1,
    )
    if with_rgb:
        group.create_array(
            "rgb", shape=(n, H, W, 3), dtype="uint8", chunks=(1, H, W, 3), shards=(s, H, W, 3),
            compressors=_compressors("rgb"), fill_value=0,
        )
    group.create_array("ids", shape=(n,), dtype=str, chunks=(s,), fill_value="", compressors=_compressors("ids"))
    _writer(group)  # opened once here, reused by write_shard (by group or path) while the metadata is unchanged
    return group


def resize_token_store(store: StoreLike, n: int) -> None:
    """Change the sample count of a writable token store to ``n`` (every per-sample array).

    Used by writers that learn ``N`` while streaming (e.g. a Squirrel import); samples beyond the old
    size are unwritten (fill values) until their shards are written.
    """
    group = _writable_group(store)
    if n < 0:
        raise ConfigError(f"token store size n={n} is invalid: must be >= 0")
    for name in _SAMPLE_ARRAYS:
        if name in group:
            arr = group[name]
            arr.resize((n, *arr.shape[1:]))


def _describe(store: StoreLike) -> str:
    return str(store.store_path) if isinstance(store, zarr.Group) else str(store)


def _local_root(obj: zarr.Group | zarr.Array) -> Path | None:
    """The folder of a group or array in a local directory store, else None (memory, fsspec URL)."""
    if not isinstance(obj.store, LocalStore):
        return None
    return Path(obj.store.root) / obj.path if obj.path else Path(obj.store.root)


def _context(label: str) -> str:
    """``"<stage> stage, artifact <id>: token store <label>"``, the first two when the store lies in an
    artifact folder (published or staging); else ``"token store <label>"``."""
    for part in reversed(Path(label).parts):
        match = _ARTIFACT_DIR.match(part)
        if match:
            return f"{match['stage']} stage, artifact {part}: token store {label}"
    return f"token store {label}"


def _writable_group(store: StoreLike) -> zarr.Group:
    if isinstance(store, zarr.Group):
        return store
    if not Path(store).exists():
        raise InputError(f"token store {store}: path does not exist")
    try:
        group = zarr.open_group(str(store), mode="r+")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise InputError(f"token store {store}: not a Zarr v3 group ({exc})") from exc
    _check_layout(group, str(store))
    return group


def _as_array(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _as_f16(name: str, x: ArrayLike, shape: tuple[int, ...], where: str) -> np.ndarray:
    arr = _as_array(x)
    if arr.shape != shape:
        raise InputError(f"{where}: array {name!r} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{where}: array {name!r} has dtype {arr.dtype}, expected a float dtype")
    with np.errstate(over="ignore"):
        return arr.astype(np.float16, copy=False)


def _has_non_finite(x: np.ndarray) -> bool:
    """Whether float16 ``x`` holds a NaN or inf (all exponent bits set), by two max reductions of its bits
    (numpy's ``isfinite`` on float16 is several times slower): ``-inf``/``-nan`` are the uint16 values
    >= 0xFC00, ``+inf``/``+nan`` the int16 values >= 0x7C00."""
    bits = x.reshape(-1).view(np.uint16)
    return bool(bits.size) and (int(bits.max()) >= 0xFC00 or int(bits.view(np.int16).max()) >= 0x7C00)


def _non_finite_error(where: str, name: str, x: np.ndarray, rows: list[int], first: int,
                      ids: Sequence[str]) -> InputError:
    j = rows[0]
    more = f" (and {len(rows) - 1} more samples)" if len(rows) > 1 else ""
    return InputError(
        f"{where}: sample {ids[j]!r} (index {first + j}){more} has {int(np.count_nonzero(~np.isfinite(x[j])))} "
        f"non-finite values in {name!r} (NaN/inf, or beyond the float16 range ±65504); nothing was written"
    )


def _as_int_range(name: str, x: ArrayLike, shape: tuple[int, ...], dtype: DTypeLike, lo: int, hi: int,
                  where: str) -> np.ndarray:
    arr = _as_array(x)
    if arr.shape != shape:
        raise InputError(f"{where}: array {name!r} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{where}: array {name!r} has dtype {arr.dtype}, expected an integer dtype")
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise InputError(
            f"{where}: array {name!r} has values in [{int(arr.min())}, {int(arr.max())}], allowed [{lo}, {hi}]"
        )
    return arr.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# the fast path: direct shard reads and writes for exactly our codec chains
# --------------------------------------------------------------------------------------------------


def fast_path_unsupported_reason(array: zarr.Array) -> str | None:
    """None when :class:`_ShardFile` (sharded per-sample arrays) or the ids writer handles ``array``
    directly; else why reads and writes of it go through zarr-python.

    Handled: a Zarr v3 array in a local directory with the default ``/`` chunk keys, and either one
    ``sharding_indexed`` codec (index at the end, ``[bytes, crc32c]``; inner chunks of one sample;
    inner codecs ``bytes`` (little-endian), at most one of blosc / zstd, then ``crc32c``) over a
    fixed-size numeric dtype, or (1-D strings) ``[vlen-utf8, crc32c]`` chunks.
    """
    if _local_root(array) is None:
        return f"its store ({type(array.store).__name__}) is not a local directory"
    meta = array.metadata
    if meta.zarr_format != 3:
        return f"it is a Zarr v{meta.zarr_format} array, not v3"
    encoding = meta.chunk_key_encoding
    if getattr(encoding, "name", None) != "default" or getattr(encoding, "separator", None) != "/":
        return f"its chunk key encoding is {encoding}, not the default with '/'"
    codecs = tuple(meta.codecs)
    if array.dtype.kind in "TUO":
        if array.ndim == 1 and codecs == (VLenUTF8Codec(), Crc32cCodec()):
            return None
        return f"its string codecs are {[c.to_dict()['name'] for c in codecs]}, not [vlen-utf8, crc32c]"
    if array.dtype.kind not in "fiu":
        return f"its dtype {array.dtype} is not a plain numeric type"
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return f"its codecs are {[c.to_dict()['name'] for c in codecs]}, not one sharding_indexed codec"
    sharding = codecs[0]
    if sharding.index_location != ShardingCodecIndexLocation.end:
        return "its shard index lies at the start, not the end"
    if tuple(sharding.index_codecs) != (BytesCodec(endian="little"), Crc32cCodec()):
        return "its shard index codecs are not [bytes (little-endian), crc32c]"
    if tuple(sharding.chunk_shape) != (1, *array.shape[1:]):
        return f"its inner chunks {tuple(sharding.chunk_shape)} are not one sample (1, {array.shape[1:]})"
    if tuple(array.shards or ())[1:] != tuple(array.shape[1:]):
        return f"its shards {array.shards} do not span whole samples"
    inner = tuple(sharding.codecs)
    first_ok = isinstance(inner[0], BytesCodec) and (inner[0].endian is None or inner[0].endian.value == "little")
    middle_ok = len(inner) == 2 or (len(inner) == 3 and isinstance(inner[1], BloscCodec | ZstdCodec))
    if not (first_ok and middle_ok and isinstance(inner[-1], Crc32cCodec)):
        return (f"its inner codecs are {[c.to_dict()['name'] for c in inner]}, not [bytes, (blosc | zstd), "
                "crc32c]")
    return None


def _numcodec(codec: Any) -> Any:
    """The numcodecs codec doing zarr's ``codec`` step (same configuration, so the same bytes)."""
    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
        return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle,
                               blocksize=codec.blocksize, typesize=codec.typesize)
    return numcodecs.Zstd(level=codec.level, checksum=codec.checksum)


@cache
def _f16_to_f32() -> np.ndarray:
    """The float32 value of every float16 bit pattern (256 KiB, stays in cache)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``; float16 → float32 by table look-up (exact, and faster than numpy's cast)."""
    if dst.dtype == np.float32 and src.dtype == np.float16:
        np.take(_f16_to_f32(), src.view(np.uint16), out=dst, mode="clip")  # "raise" would buffer `out`
    else:
        dst[...] = src


def _crc(data: Any) -> bytes:
    """crc32c of a contiguous buffer, as the 4 little-endian bytes zarr's ``crc32c`` codec appends."""
    return int(google_crc32c.value(np.frombuffer(data, dtype=np.uint8))).to_bytes(4, "little")


@cache
def _fallocate() -> Any:
    """Linux ``fallocate(2)`` through libc, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a file about to be written with ``size`` bytes, without changing its size
    (``FALLOC_FL_KEEP_SIZE``, as numpy's ``tofile`` does), which speeds up writes on ext4. A no-op
    where unsupported (never glibc's zero-writing ``posix_fallocate`` emulation)."""
    fallocate = _fallocate()
    if fallocate is not None and size:
        fallocate(fd, 1, 0, size)  # a failure (EOPNOTSUPP on some filesystems) only loses the speed-up


def _write_atomic(path: Path, buffers: list[Any]) -> None:
    """Write ``buffers`` to ``path`` with ``writev`` through a temporary file renamed into place.

    Stale temporary files of ``path`` (a killed writer's) are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{_TMP}"
    for stale in os.listdir(path.parent):
        if stale.startswith(prefix):
            (path.parent / stale).unlink(missing_ok=True)
    tmp = path.parent / f"{prefix}{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        views = [memoryview(b).cast("B") for b in buffers]
        _preallocate(fd, sum(len(v) for v in views))
        while views:
            written = os.writev(fd, views[:_IOV_MAX])
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if written:
                views[0] = views[0][written:]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


class _ShardFile:
    """Direct reader/writer of one sharded per-sample array (see :func:`fast_path_unsupported_reason`).

    Shard files are read with ``pread``/``preadv`` at the offsets of their index, which is read once per
    file version (keyed by inode, size and mtime) and checked against its crc32c; every chunk's crc32c
    is checked on every read.
    """

    def __init__(self, array: zarr.Array, name: str, where: str) -> None:
        self.name, self.where = name, where
        self.root = _local_root(array)
        self.encode_key = array.metadata.encode_chunk_key
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.sample_shape = tuple(array.shape[1:])
        self.nbytes = prod(self.sample_shape) * self.dtype.itemsize
        self.shard_size = int(array.shards[0])
        self.fill = np.asarray(array.fill_value, dtype=self.dtype)
        inner = array.metadata.codecs[0].codecs
        self.codec = _numcodec(inner[1]) if len(inner) == 3 else None
        self.index_nbytes = 16 * self.shard_size + 4
        self.run_samples = max(1, min(_RUN_BYTES // self.nbytes, _IOV_MAX // 2))
        self._indexes: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}
        self._paths: dict[int, str] = {}
        self._local = threading.local()

    def path(self, shard: int) -> Path:
        return self.root / self.encode_key((shard,) + (0,) * len(self.sample_shape))

    def _corrupt(self, shard: int, what: str, sample: int | None = None) -> InputError:
        which = f"sample {sample}" if sample is not None else f"shard {shard}"
        return InputError(f"{self.where}: array {self.name!r} is corrupt ({which}, file {self.path(shard)}: "
                          f"{what}); run `stegopipe verify` and rebuild the artifact")

    def _index(self, fd: int, shard: int) -> np.ndarray:
        st = os.fstat(fd)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._indexes.get(shard)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if st.st_size < self.index_nbytes:
            raise self._corrupt(shard, f"shard file of {st.st_size} bytes is shorter than its index")
        raw = os.pread(fd, self.index_nbytes, st.st_size - self.index_nbytes)
        if len(raw) != self.index_nbytes or _crc(raw[:-4]) != raw[-4:]:
            raise self._corrupt(shard, "shard index checksum mismatch")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.shard_size, 2)
        used = index[:, 0] != _EMPTY
        if (index[used, 0] + index[used, 1] > st.st_size - self.index_nbytes).any():
            raise self._corrupt(shard, "shard index points beyond the chunk data")
        self._indexes[shard] = (stamp, index)
        return index

    def read(self, idx: np.ndarray, dtype: DTypeLike | None = None) -> np.ndarray:
        """Samples ``idx`` (in range; any order, repeats allowed) as ``[k, *sample_shape]`` in ``dtype``
        (default: the stored one; another is cast chunk by chunk while the chunk is in cache)."""
        out = np.empty((len(idx), *self.sample_shape), dtype=self.dtype if dtype is None else dtype)
        if len(idx) == 0:
            return out
        order = np.argsort(idx, kind="stable") if len(idx) > 1 else np.zeros(1, dtype=np.int64)
        ordered = idx[order]
        shards = ordered // self.shard_size
        bounds = [0, *(np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist(), len(idx)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
            self._read_shard(int(shards[lo]), ordered[lo:hi], order[lo:hi], out)
        return out

    def _read_shard(self, shard: int, samples: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        path = self._paths.get(shard)
        if path is None:
            path = self._paths.setdefault(shard, str(self.path(shard)))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard never written: fill values, as zarr-python reads it
            out[rows] = self.fill
            return
        try:
            index = self._index(fd, shard)
            local = samples - shard * self.shard_size
            offsets, lengths = index[local, 0].tolist(), index[local, 1].tolist()
            limit = self.run_samples if self.codec is None else _IOV_MAX
            start = 0
            while start < len(samples):  # runs of chunks stored back to back
                stop = start + 1
                while (stop < len(samples) and stop - start < limit and offsets[stop] != _EMPTY
                       and offsets[stop - 1] != _EMPTY and offsets[stop] == offsets[stop - 1] + lengths[stop - 1]):
                    stop += 1
                self._read_run(fd, samples[start:stop], rows[start:stop], offsets[start:stop],
                               lengths[start:stop], out)
                start = stop
        finally:
            os.close(fd)

    def _scratch(self, nbytes: int) -> np.ndarray:
        """A reused per-thread byte buffer (hot in cache, no page faults of a fresh allocation)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = self._local.buf = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes]

    def _read_run(self, fd: int, samples: np.ndarray, rows: np.ndarray, offsets: list[int],
                  lengths: list[int], out: np.ndarray) -> None:
        if offsets[0] == _EMPTY:  # a chunk zarr-python skipped as equal to the fill value
            out[rows[0]] = self.fill
            return
        span = offsets[-1] + lengths[-1] - offsets[0]
        if self.codec is None:  # raw chunks: read straight into the output rows (or scratch), crcs aside
            if any(length != self.nbytes + 4 for length in lengths):
                bad = int(samples[[length != self.nbytes + 4 for length in lengths].index(True)])
                raise self._corrupt(bad // self.shard_size, "chunk length does not match the sample size", bad)
            cast = out.dtype != self.dtype
            target = (self._scratch(len(rows) * self.nbytes).reshape(len(rows), self.nbytes) if cast
                      else out.reshape(len(out), -1).view(np.uint8))
            places = range(len(rows)) if cast else rows
            crcs = bytearray(4 * len(samples))
            crc_view = memoryview(crcs)
            buffers: list[Any] = []
            for j, place in enumerate(places):
                buffers += [target[place], crc_view[4 * j:4 * j + 4]]
            got = os.preadv(fd, buffers, offsets[0])
            for j, place in enumerate(places):
                if got < span or _crc(target[place]) != crcs[4 * j:4 * j + 4]:
                    sample = int(samples[j])
                    raise self._corrupt(sample // self.shard_size,
                                        "chunk checksum mismatch" if got >= span else "truncated chunk", sample)
            if cast:
                values = target.view(self.dtype).reshape(len(rows), *self.sample_shape)
                for j, row in enumerate(rows):
                    _cast_into(out[row], values[j])
            return
        data = memoryview(os.pread(fd, span, offsets[0]))
        pos = 0
        for j, row in enumerate(rows):
            chunk = data[pos:pos + lengths[j]]
            pos += lengths[j]
            sample = int(samples[j])
            if len(chunk) < 4 or _crc(chunk[:-4]) != chunk[-4:]:
                raise self._corrupt(sample // self.shard_size, "chunk checksum mismatch"
                                    if len(chunk) == lengths[j] else "truncated chunk", sample)
            try:
                decoded = self.codec.decode(chunk[:-4])
            except Exception as exc:  # numcodecs raises RuntimeError/ValueError on bad input
                raise self._corrupt(sample // self.shard_size, f"{self.codec.codec_id} decode failed ({exc})",
                                    sample) from exc
            raw = np.frombuffer(decoded, dtype=np.uint8)
            if raw.size != self.nbytes:
                raise self._corrupt(sample // self.shard_size, f"chunk decodes to {raw.size} bytes, expected "
                                    f"{self.nbytes}", sample)
            out[row] = raw.view(self.dtype).reshape(self.sample_shape)

    def encode(self, data: np.ndarray, non_finite: list[int] | None = None) -> list[Any]:
        """The bytes (a list of buffers) of a shard file holding samples ``data`` (``[k, *sample_shape]``,
        ``k <= S``). With ``non_finite`` (float16 data), the rows holding NaN/inf are appended to it, each
        checked while its chunk is in cache for the checksum."""
        data = np.ascontiguousarray(data, dtype=self.dtype)
        index = np.full((self.shard_size, 2), _EMPTY, dtype="<u8")
        buffers: list[Any] = []
        offset = 0
        for j in range(len(data)):
            if non_finite is not None and _has_non_finite(data[j]):
                non_finite.append(j)
            payload = data[j] if self.codec is None else self.codec.encode(data[j])
            buffers += [payload, _crc(payload)]
            size = memoryview(payload).nbytes + 4
            index[j] = (offset, size)
            offset += size
        index_bytes = index.tobytes()
        return [*buffers, index_bytes, _crc(index_bytes)]


def _ids_chunk(array: zarr.Array, ids: list[str]) -> list[Any]:
    """The bytes of one chunk of the ``[vlen-utf8, crc32c]`` ids array (padded with ``""`` to a full chunk,
    as zarr-python stores edge chunks)."""
    size = int(array.chunks[0])
    payload = numcodecs.VLenUTF8().encode(np.array(ids + [""] * (size - len(ids)), dtype=object))
    return [payload, _crc(payload)]


class _StoreWriter:
    """The arrays of a writable store, opened once: the sharded ones the fast path handles as
    :class:`_ShardFile`, ``fast_ids`` when the ids chunks (one per shard) are written directly, the rest
    through zarr-python."""

    def __init__(self, group: zarr.Group, label: str) -> None:
        self.label = label
        self.meta, arrays = _check_layout(group, label)
        self.arrays = {name: arr.with_config(_WRITE_CONFIG) for name, arr in arrays.items()}
        fast = {name: fast_path_unsupported_reason(arr) is None for name, arr in arrays.items()}
        where = _context(label)
        self.sharded = {name: _ShardFile(arr, name, where) for name, arr in arrays.items()
                        if name != "ids" and fast[name]}
        self.fast_ids = fast["ids"] and tuple(arrays["ids"].chunks) == (int(self.meta["shard_size"]),)

    def encode(self, name: str, data: np.ndarray, check_finite: bool) -> tuple[Any, list[int]]:
        """What :meth:`write` writes for ``data`` (file bytes on the fast path, else ``data``), and the rows
        of ``data`` holding NaN/inf when ``check_finite``."""
        bad: list[int] = []
        if name in self.sharded:
            return self.sharded[name].encode(data, bad if check_finite else None), bad
        if check_finite:
            bad = [j for j in range(len(data)) if _has_non_finite(data[j])]
        if name == "ids" and self.fast_ids:
            return _ids_chunk(self.arrays[name], list(data)), bad
        return data, bad

    def write(self, shard: int, a: int, name: str, encoded: Any) -> None:
        """Write ``encoded`` (from :meth:`encode`), samples ``[a, ...)`` of shard ``shard``."""
        target = self.arrays[name]
        if name in self.sharded:
            _write_atomic(self.sharded[name].path(shard), encoded)
        elif name == "ids" and self.fast_ids:
            _write_atomic(_local_root(target) / target.metadata.encode_chunk_key((shard,)), encoded)
        else:
            # zarr 3.1 merges a write into the existing shard (or chunk) file, reading it first even when
            # every chunk is overwritten; drop the files the write covers whole, so a corrupt or truncated
            # one cannot block a re-run.
            b = a + len(encoded)
            size = int((target.shards or target.chunks)[0])
            for c in range(a // size, -(-b // size)):
                if c * size >= a and min((c + 1) * size, target.shape[0]) <= b:
                    key = target.metadata.encode_chunk_key((c,) + (0,) * (target.ndim - 1))
                    (target.store_path / key).delete_sync()
            target[a:b] = encoded


_WRITERS: dict[str, tuple[tuple[Any, ...], _StoreWriter]] = {}
_WRITERS_LOCK = threading.Lock()


def _metadata_stamp(root: Path) -> tuple[Any, ...]:
    """Changes whenever the group's or an array's metadata file is rewritten (e.g. a resize)."""
    stamp = []
    for name in ("", *_SAMPLE_ARRAYS):
        try:
            st = os.stat(root / name / "zarr.json")
        except FileNotFoundError:
            stamp.append(None)
            continue
        stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _writer(store: StoreLike) -> _StoreWriter:
    """The writer of ``store``; for a local directory cached per path while its metadata is unchanged."""
    root = _local_root(store) if isinstance(store, zarr.Group) else Path(store)
    if root is None:
        return _StoreWriter(store, _describe(store))
    key = os.path.abspath(root)
    stamp = _metadata_stamp(root)
    with _WRITERS_LOCK:
        cached = _WRITERS.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    group = store if isinstance(store, zarr.Group) else _writable_group(store)
    writer = _StoreWriter(group, _describe(store))
    with _WRITERS_LOCK:
        _WRITERS[key] = (stamp, writer)
    return writer


def write_shard(
    store_or_path: StoreLike,
    shard_index: int,
    *,
    tokens: ArrayLike,
    labels: ArrayLike,
    rgb: ArrayLike | None = None,
    tokens_flip: ArrayLike | None = None,
    ids: Sequence[str],
) -> None:
    """Write every sample of shard ``shard_index`` (all arrays) in one go.

    Inputs are numpy arrays or torch tensors covering exactly the shard's sample range: tokens (and
    tokens_flip) ``[k,h,w,D]`` float (stored float16), labels ``[k,H,W]`` integers in [-1, 32767], rgb
    ``[k,H,W,3]`` integers in [0, 255], ids ``k`` strings. Everything is validated before anything is
    written; NaN/inf tokens raise :class:`InputError` naming the stage and artifact (when the store lies
    in an artifact folder), the store, the shard and the sample. Each shard file is replaced atomically.
    """
    writer = _writer(store_or_path)
    meta = writer.meta
    n = writer.arrays["tokens"].shape[0]
    ranges = shard_ranges(n, meta["shard_size"])
    if not 0 <= shard_index < len(ranges):
        raise InputError(f"token store {writer.label}: shard_index={shard_index} out of range [0, {len(ranges)})")
    a, b = ranges[shard_index]
    k = b - a
    h, w = meta["grid"]
    H, W = meta["label_hw"]
    where = f"{_context(writer.label)}, shard {shard_index} (samples {a}..{b - 1})"
    id_list = [str(i) for i in ids]
    if len(id_list) != k:
        raise InputError(f"{where}: got {len(id_list)} ids, expected {k}")
    data: dict[str, np.ndarray] = {
        "tokens": _as_f16("tokens", tokens, (k, h, w, meta["dim"]), where),
        "labels": _as_int_range("labels", labels, (k, H, W), np.int16, -1, np.iinfo(np.int16).max, where),
    }
    for name, value, shape in (("tokens_flip", tokens_flip, (k, h, w, meta["dim"])), ("rgb", rgb, (k, H, W, 3))):
        if (name in writer.arrays) != (value is not None):
            state = "has" if name in writer.arrays else "has no"
            raise InputError(f"{where}: the store {state} array {name!r} but {name}={'None' if value is None else 'given'}")
        if value is not None:
            data[name] = (_as_f16(name, value, shape, where) if name == "tokens_flip"
                          else _as_int_range(name, value, shape, np.uint8, 0, 255, where))
    data["ids"] = np.array(id_list, dtype=object) if k else np.array([], dtype=object)
    encoded = {}
    for name, arr in data.items():  # everything encoded and checked before anything is written
        encoded[name], bad = writer.encode(name, arr, check_finite=name.startswith("tokens"))
        if bad:
            raise _non_finite_error(where, name, arr, bad, a, id_list)
    for name, value in encoded.items():
        writer.write(shard_index, a, name, value)


class TokenStore:
    """Read-only view of a token store (open with :func:`open_token_store` or :func:`open_tokens`).

    Arrays and metadata are opened once. Reads of per-sample arrays use the direct shard reader where
    :func:`fast_path_unsupported_reason` allows (see :attr:`fast_path`), else zarr-python; either way
    every chunk's checksum is checked, and corruption raises :class:`InputError` naming the store, the
    array and the sample (or the samples / shard read).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if not Path(self.path).exists():
            raise InputError(f"token store {self.path}: path does not exist (run the extract stage first)")
        try:
            group = zarr.open_group(self.path, mode="r")
        except Exception as exc:  # zarr raises several types for "not a group"
            raise InputError(f"token store {self.path}: not a Zarr v3 group ({exc})") from exc
        self._group = group
        self._meta, self._opened = _check_layout(group, self.path)
        self._n = int(self._opened["tokens"].shape[0])
        self.fast_path: dict[str, str | None] = {
            name: fast_path_unsupported_reason(arr) for name, arr in self._opened.items()}
        """Per array: None when it is read directly, else the reason it is read through zarr-python."""
        where = _context(self.path)
        self._direct = {name: _ShardFile(arr, name, where) for name, arr in self._opened.items()
                        if name != "ids" and self.fast_path[name] is None}

    @property
    def n(self) -> int:
        """Number of samples."""
        return self._n

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)``."""
        h, w = self._meta["grid"]
        return int(h), int(w)

    @property
    def dim(self) -> int:
        """Token dimension ``D``."""
        return int(self._meta["dim"])

    @property
    def label_hw(self) -> tuple[int, int]:
        """Label / rgb size ``(H, W)``."""
        H, W = self._meta["label_hw"]
        return int(H), int(W)

    @property
    def shard_size(self) -> int:
        """Samples per shard."""
        return int(self._meta["shard_size"])

    @property
    def arrays(self) -> tuple[str, ...]:
        """Per-sample arrays present in this store."""
        return tuple(self._opened)

    @property
    def has_rgb(self) -> bool:
        return "rgb" in self._opened

    @property
    def has_flip(self) -> bool:
        return "tokens_flip" in self._opened

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """User attributes given at creation (the store's own metadata excluded)."""
        return {k: v for k, v in self._group.attrs.asdict().items() if k != _META_KEY}

    @cached_property
    def ids(self) -> list[str]:
        """Sample ids in store order."""
        arr = self._array("ids")
        try:
            return [str(v) for v in arr[:]]
        except (ValueError, RuntimeError, OSError):
            for shard, (a, b) in enumerate(self.shard_ranges()):  # name the shard that fails
                self._checked("ids", lambda arr: arr[a:b], f"shard {shard}, samples [{a}, {b})")
            raise

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {sample_id: i for i, sample_id in enumerate(self.ids)}

    def index_of(self, ids: str | Sequence[str]) -> np.ndarray:
        """Store indices (int64) of sample ids (one id or a sequence); InputError naming an unknown id."""
        wanted = [ids] if isinstance(ids, str) else list(ids)
        missing = [i for i in wanted if i not in self._positions]
        if missing:
            raise InputError(f"token store {self.path}: no sample with id {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more unknown ids)" if len(missing) > 1 else ""))
        return np.array([self._positions[i] for i in wanted], dtype=np.int64)

    def sample(self, key: int | str) -> dict[str, Any]:
        """One sample by index or id: ``{"id", "index", "tokens" (float32 [h,w,D]), "labels"`` (and
        ``"tokens_flip"``, ``"rgb"`` when stored)``}``."""
        i = int(self.index_of(key)[0]) if isinstance(key, str) else int(key)
        arrays = {name: self.get(name, [i], np.float32 if name.startswith("tokens") else None)[0]
                  for name in self.arrays if name != "ids"}
        return {"id": self.ids[i], "index": i, **arrays}

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Sample ranges of this store's shards."""
        return shard_ranges(self.n, self.shard_size)

    def _array(self, name: str) -> zarr.Array:
        """The opened array ``name``."""
        if name not in self._opened:
            raise InputError(f"token store {self.path}: has no array {name!r} (it has {', '.join(self.arrays)})")
        return self._opened[name]

    def _checked(self, name: str, read: Any, what: str) -> Any:
        """``read(array)`` through zarr-python, a failed read (checksum, decompression) reported as an
        InputError naming the store, the array and the samples."""
        try:
            return read(self._array(name))
        except (ValueError, RuntimeError, OSError) as exc:
            raise InputError(f"{_context(self.path)}: array {name!r} is corrupt ({what}: {exc}); "
                             "run `stegopipe verify` and rebuild the artifact") from exc

    def get(self, name: str, indices: ArrayLike, dtype: DTypeLike | None = None) -> np.ndarray:
        """Samples ``indices`` (any order, repeats allowed) of array ``name``, in the stored dtype or ``dtype``.

        Only the chunks of the requested samples are read and decoded.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise InputError(
                f"token store {self.path}: sample indices must lie in [0, {self.n}), got min {idx.min()} max {idx.max()}"
            )
        direct = self._direct.get(name)
        if direct is not None:
            return direct.read(idx, dtype)
        out = self._get_zarr(name, idx)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _get_zarr(self, name: str, idx: np.ndarray) -> np.ndarray:
        """:meth:`get` through zarr-python."""
        arr = self._array(name)
        if idx.size == 0:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        # Read runs of consecutive samples with basic slices, concurrently: zarr's orthogonal (fancy)
        # selection is much slower here, and a slice of a sharded array decodes only the chunks (samples)
        # it covers. Sorted, so shard files are visited in order and neighbours merge into one run.
        uniq, inverse = np.unique(idx, return_inverse=True)
        cuts = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, cuts)]
        parts = self._checked(name, lambda arr: [arr[a:b] for a, b in runs] if len(runs) == 1 else _read_runs(arr, runs),
                              f"samples {', '.join(f'[{a}, {b})' for a, b in runs[:8])}")
        if uniq.size < idx.size:  # repeats: gather from the unique rows
            return np.concatenate(parts)[inverse]
        out = np.empty((idx.size, *arr.shape[1:]), dtype=arr.dtype)
        positions = np.argsort(idx, kind="stable")  # where each sorted sample goes in the request
        start = 0
        for part in parts:  # one copy of each sample, straight to its place
            out[positions[start:start + len(part)]] = part
            start += len(part)
        return out

    def get_tokens(self, indices: ArrayLike, *, flip: bool = False) -> np.ndarray:
        """Tokens of samples ``indices`` as float32 ``[k,h,w,D]`` (``flip``: of the flipped images)."""
        return self.get("tokens_flip" if flip else "tokens", indices, np.float32)

    def get_labels(self, indices: ArrayLike) -> np.ndarray:
        """Labels of samples ``indices`` as int16 ``[k,H,W]`` (-1 = ignore)."""
        return self.get("labels", indices)

    def get_rgb(self, indices: ArrayLike) -> np.ndarray:
        """Images of samples ``indices`` as uint8 ``[k,H,W,3]``."""
        return self.get("rgb", indices)

    def iter_batches(
        self,
        batch_size: int,
        *,
        arrays: Sequence[str] = ("tokens",),
        start: int = 0,
        stop: int | None = None,
        tokens_dtype: DTypeLike = np.float32,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream samples ``[start, stop)`` in order as dicts of ``arrays`` plus ``"index"`` (int64).

        Reads one shard (clipped to the range) at a time and prefetches the next one in a background
        thread; batches span shard boundaries, the last one may be short. Token arrays are cast to
        ``tokens_dtype`` (float32 by default).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid: must be a positive integer")
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise InputError(f"token store {self.path}: range [{start}, {stop}) is not within [0, {self.n}]")
        names = list(arrays)
        for name in names:
            self._array(name)
        pieces = [(max(a, start), min(b, stop)) for a, b in self.shard_ranges() if b > start and a < stop]

        def read(piece: tuple[int, int]) -> dict[str, np.ndarray]:
            a, b = piece
            out = {name: self.get(name, np.arange(a, b), tokens_dtype if name.startswith("tokens") else None)
                   for name in names}
            out["index"] = np.arange(a, b, dtype=np.int64)
            return out

        buffer: list[dict[str, np.ndarray]] = []
        buffered = 0
        with prefetch(read, pieces, workers=1, name="store-stream") as chunks:
            for chunk in chunks:
                buffer.append(chunk)
                buffered += len(chunk["index"])
                while buffered >= batch_size:
                    batch, buffer = _split(buffer, batch_size)
                    buffered -= batch_size
                    yield batch
            if buffered:
                yield _split(buffer, buffered)[0]

    def dask_tokens(self, flatten: bool = True, *, flip: bool = False):  # -> dask.array.Array
        """Lazy float16 dask array of tokens, one dask chunk per shard.

        ``flatten=True`` gives ``[N*h*w, D]`` (rows sample-major, then grid row, then column), else
        ``[N,h,w,D]``. Opens the store by path, so tasks can run on other Dask workers.
        """
        import dask.array as da

        name = "tokens_flip" if flip else "tokens"
        self._array(name)
        h, w = self.grid
        arr = da.from_zarr(self.path, component=name, chunks=(self.shard_size, h, w, self.dim))
        return arr.reshape(self.n * h * w, self.dim) if flatten else arr


def _split(buffer: list[dict[str, np.ndarray]], k: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """First ``k`` samples of the buffered pieces as one batch, and the remaining pieces."""
    taken: list[dict[str, np.ndarray]] = []
    rest: list[dict[str, np.ndarray]] = []
    need = k
    for piece in buffer:
        m = len(piece["index"])
        if need >= m:
            taken.append(piece)
            need -= m
        elif need > 0:
            taken.append({key: v[:need] for key, v in piece.items()})
            rest.append({key: v[need:] for key, v in piece.items()})
            need = 0
        else:
            rest.append(piece)
    batch = taken[0] if len(taken) == 1 else {key: np.concatenate([p[key] for p in taken]) for key in taken[0]}
    return batch, rest


def _check_layout(group: zarr.Group, where: str) -> tuple[dict[str, Any], dict[str, zarr.Array]]:
    """Validate a token store group's metadata and arrays; return its metadata dict and its per-sample
    arrays (opened, in :data:`_SAMPLE_ARRAYS` order)."""
    meta = group.attrs.get(_META_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise InputError(f"token store {where}: not a token store (group attribute {_META_KEY!r}.format "
                         f"is not {FORMAT_NAME!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise InputError(f"token store {where}: format version {meta.get('version')} unsupported "
                         f"(this code reads version {FORMAT_VERSION}); re-run the stage that wrote it")
    missing = [key for key in ("shard_size", "grid", "dim", "label_hw") if key not in meta]
    if missing:
        raise InputError(f"token store {where}: metadata {_META_KEY!r} lacks {', '.join(missing)}")
    h, w = meta["grid"]
    H, W = meta["label_hw"]
    D = meta["dim"]
    arrays = {name: node for name, node in group.arrays() if name in _SAMPLE_ARRAYS}
    arrays = {name: arrays[name] for name in _SAMPLE_ARRAYS if name in arrays}
    if "tokens" not in arrays:
        raise InputError(f"token store {where}: array 'tokens' is missing")
    n = arrays["tokens"].shape[0]
    expected = {
        "tokens": ((n, h, w, D), np.dtype("float16")),
        "tokens_flip": ((n, h, w, D), np.dtype("float16")),
        "labels": ((n, H, W), np.dtype("int16")),
        "rgb": ((n, H, W, 3), np.dtype("uint8")),
    }
    for name in ("tokens", "labels", "ids"):
        if name not in arrays:
            raise InputError(f"token store {where}: array {name!r} is missing")
    for name, (shape, dtype) in expected.items():
        if name not in arrays:
            continue
        arr = arrays[name]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise InputError(f"token store {where}: array {name!r} is {arr.dtype}{list(arr.shape)}, "
                             f"expected {dtype}{list(shape)}")
    ids = arrays["ids"]
    if tuple(ids.shape) != (n,) or ids.dtype.kind not in "TUO":
        raise InputError(f"token store {where}: array 'ids' is {ids.dtype}{list(ids.shape)}, expected strings [{n}]")
    return meta, arrays


def open_token_store(path: str | os.PathLike[str]) -> TokenStore:
    """Open a token store read-only; :class:`InputError` naming the path if it is missing or malformed."""
    return TokenStore(path)


class TokensArtifact(ArtifactView):
    """A ``tokens`` artifact folder (extract's output, or an imported store): its token store, and its
    manifest, params (split, backbone, res, ...) and lineage. The one place that knows where the store
    sits inside the artifact."""

    @property
    def store_path(self) -> Path:
        return self.path / TOKENS_STORE

    @cached_property
    def store(self) -> TokenStore:
        return TokenStore(self.store_path)


def open_tokens(ref: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> TokenStore:
    """Open the token store of a tokens artifact, for notebooks and scripts (read-only).

    ``ref`` is an artifact id, an unambiguous id prefix (``"extract-3f2a"``), an artifact folder or a
    ``tokens.zarr`` path. Ids are looked up under ``root`` (default: ``$STEGOPIPE_ROOT``, else
    ``./artifacts``). InputError / MissingArtifactError name what was not found.
    """
    from pipeline.artifacts import ArtifactStore

    path = Path(ref).expanduser()
    if not path.exists():
        store = ArtifactStore(root if root is not None else os.environ.get("STEGOPIPE_ROOT", "artifacts"))
        path = store.path(store.resolve(str(ref)))
    if (path / "zarr.json").is_file():
        return TokenStore(path)
    if (path / TOKENS_STORE).is_dir():
        return TokenStore(path / TOKENS_STORE)
    raise InputError(f"{path}: neither a token store nor an artifact folder holding {TOKENS_STORE} "
                     "(is it a tokens artifact, from the extract stage?)")
