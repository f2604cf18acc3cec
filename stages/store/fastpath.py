"""The fast path: direct ``pread``/``preadv`` reads and ``writev`` writes of shard files for exactly our
codec chains on a local directory, byte-identical to zarr-python (see :func:`fast_path_unsupported_reason`)."""
from __future__ import annotations

import ctypes
import os
import threading
from functools import cache
from math import prod
from pathlib import Path
from typing import Any

import crc32c
import numcodecs
import numpy as np
import zarr
from numpy.typing import DTypeLike
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, VLenUTF8Codec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from pipeline.errors import InputError
from stages.store.layout import _local_root

_EMPTY = 2**64 - 1
"""Offset and length of an empty shard index entry (no chunk stored)."""
_RUN_BYTES = 1 << 20
"""Raw chunks are read about this many bytes per ``preadv`` and checksummed (and cast) while in cache."""
_IOV_MAX = 1000  # below every platform's IOV_MAX (1024 on Linux)
_TMP = ".tmp-"

def _has_non_finite(x: np.ndarray) -> bool:
    """Whether float16 ``x`` holds a NaN or inf (all exponent bits set), by two max reductions of its bits
    (numpy's ``isfinite`` on float16 is several times slower): ``-inf``/``-nan`` are the uint16 values
    >= 0xFC00, ``+inf``/``+nan`` the int16 values >= 0x7C00."""
    bits = x.reshape(-1).view(np.uint16)
    return bool(bits.size) and (int(bits.max()) >= 0xFC00 or int(bits.view(np.int16).max()) >= 0x7C00)



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


_CAST_SLICE = 1 << 15
"""Elements per float16 → float32 copy off the main thread: torch runs a copy below its grain size (32768)
on the calling thread, so a stream's reader threads never wait on (or oversubscribe) the intra-op pool."""


def cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (both C-contiguous); float16 → float32 with the CPU's conversion instructions
    through torch: exact (signalling NaNs come back quiet; stores hold no NaN), and several times faster
    than numpy's cast or a table look-up. On the main thread (a consumer's own ``get``) one copy on torch's
    intra-op pool, like any torch op there: a 0.6 MB sample read from disk casts in 0.11-0.13 ms, against
    0.20-0.22 ms in slices (benchmarks/bench_store.py's random reads)."""
    if dst.dtype == np.float32 and src.dtype == np.float16:
        import torch  # the project's dependency; imported on the first float32 read only

        to, source = torch.from_numpy(dst.reshape(-1)), torch.from_numpy(src.reshape(-1))
        if threading.current_thread() is threading.main_thread():
            to.copy_(source)
            return
        for a in range(0, to.numel(), _CAST_SLICE):
            to[a:a + _CAST_SLICE].copy_(source[a:a + _CAST_SLICE])
    else:
        dst[...] = src


def max_encoded_length(nbytes: int, compressed: bool) -> int:
    """The longest stored chunk (codec output + crc32c) of a ``nbytes`` sample: exactly ``nbytes + 4`` raw;
    compressed, at most blosc's and zstd's worst-case expansion (< 1/128 + 1 KiB) over ``nbytes``."""
    return nbytes + (nbytes // 128 + 1024 if compressed else 0) + 4


def shard_index_nbytes(sharding: ShardingCodec, shard_shape: tuple[int, ...]) -> int:
    """Bytes of the index of a shard of ``shard_shape`` under ``sharding``: an offset and a length (uint64)
    per inner chunk, then a crc32c when the index codecs end in one (the only fixed-size index codecs)."""
    entries = prod(s // c for s, c in zip(shard_shape, sharding.chunk_shape, strict=True))
    return 16 * entries + (4 if isinstance(sharding.index_codecs[-1], Crc32cCodec) else 0)


def shard_index_problem(index: np.ndarray, data_start: int, data_end: int,
                        lengths: tuple[int, int]) -> tuple[int, str] | None:
    """The first entry of a shard index (``[k, 2]`` uint64 offsets and lengths) that is neither empty (both
    ``2**64 - 1``) nor a chunk inside the data bytes ``[data_start, data_end)`` whose length lies in
    ``lengths`` (inclusive), or that overlaps another chunk: ``(entry, what is wrong)``; None when sound.
    Exact integer arithmetic: an offset + length beyond ``2**64`` is out of bounds, never wrapped."""
    offsets, sizes = index[:, 0], index[:, 1]
    used = np.flatnonzero(~((offsets == _EMPTY) & (sizes == _EMPTY)))
    start, end = np.uint64(data_start), np.uint64(data_end)
    lo, hi = (np.uint64(v) for v in lengths)
    outside = used[(offsets[used] < start) | (offsets[used] > end)]
    if outside.size:
        j = int(outside[0])
        return j, f"chunk offset {int(offsets[j])} lies outside the data bytes [{data_start}, {data_end})"
    off, size = offsets[used], sizes[used]  # every offset <= end: end - off cannot wrap
    wrong = used[(size > end - off) | (size < lo) | (size > hi)]
    if wrong.size:
        j = int(wrong[0])
        off_j, size_j = int(offsets[j]), int(sizes[j])
        if size_j > data_end - off_j:
            return j, f"chunk [{off_j}, {off_j} + {size_j}) runs past the data bytes (end {data_end})"
        return j, f"chunk length {size_j} is not in [{lengths[0]}, {lengths[1]}]"
    order = np.argsort(off, kind="stable")
    overlaps = np.flatnonzero(off[order][1:] < off[order][:-1] + size[order][:-1])
    if overlaps.size:
        first, second = used[order[overlaps[0]]], used[order[overlaps[0] + 1]]
        return int(second), f"chunk overlaps the chunk of entry {int(first)} (aliased samples)"
    return None


def _zstd_content_size(frame: Any) -> int | None:
    """The decoded size a zstd frame header declares (RFC 8878 §3.1.1.1), None when it declares none."""
    head = bytes(frame[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    single_segment = descriptor >> 5 & 1
    pos = 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if not width or len(head) < pos + width:
        return None
    value = int.from_bytes(head[pos:pos + width], "little")
    return value + 256 if width == 2 else value


def declared_size(codec: Any, payload: Any, length: int | None = None) -> int | None:
    """The decoded size the header of a blosc or zstd ``payload`` declares (None: none, or blosc's header
    claims another compressed length than the payload's, ``length`` when only its head is given), read
    before anything is decoded."""
    if isinstance(codec, numcodecs.Blosc):
        head = bytes(payload[:16])
        if len(head) < 16 or int.from_bytes(head[12:16], "little") != (len(payload) if length is None else length):
            return None
        return int.from_bytes(head[4:8], "little")
    return _zstd_content_size(payload)


def decode_capped(codec: Any, payload: Any, out: np.ndarray) -> str | None:
    """Decode ``payload`` (blosc or zstd) into the bytes of ``out`` (C-contiguous), which must be exactly
    what its header declares; never allocates beyond ``out``. None when done, else what is wrong."""
    size = declared_size(codec, payload)
    if size != out.nbytes:
        return (f"{codec.codec_id} header declares {'no decoded size' if size is None else f'{size} bytes'}, "
                f"expected {out.nbytes}")
    try:
        codec.decode(payload, out=out.reshape(-1).view(np.uint8))
    except Exception as exc:  # numcodecs raises RuntimeError/ValueError on bad input
        return f"{codec.codec_id} decode failed ({exc})"
    return None


def _crc(data: Any) -> bytes:
    """crc32c of a contiguous buffer, as the 4 little-endian bytes zarr's ``crc32c`` codec appends. The
    ``crc32c`` package (SSE4.2) releases the GIL from 32 KiB on, so checksums on stream threads overlap."""
    return crc32c.crc32c(np.frombuffer(data, dtype=np.uint8)).to_bytes(4, "little")


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
    file version (keyed by inode, size and mtime) and checked: its crc32c, every chunk inside the data,
    of the exact length (raw) or at most the worst-case compressed length, no two chunks overlapping.
    Every chunk's crc32c is checked on every read, and compressed chunks decode into the sample's bytes
    only (a header declaring another size is refused before decoding). A missing shard file or an empty
    index entry for a sample of the array is an error: every sample is always written.
    """

    def __init__(self, array: zarr.Array, name: str, where: str) -> None:
        self.name, self.where = name, where
        self.root = _local_root(array)
        self.encode_key = array.metadata.encode_chunk_key
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.sample_shape = tuple(array.shape[1:])
        self.nbytes = prod(self.sample_shape) * self.dtype.itemsize
        self.shard_size = int(array.shards[0])
        inner = array.metadata.codecs[0].codecs
        self.codec = _numcodec(inner[1]) if len(inner) == 3 else None
        self.index_nbytes = shard_index_nbytes(array.metadata.codecs[0], tuple(array.shards))
        self.chunk_lengths = ((self.nbytes + 4,) * 2 if self.codec is None
                              else (5, max_encoded_length(self.nbytes, compressed=True)))
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

    def _missing(self, sample: int, what: str) -> InputError:
        return InputError(f"{self.where}: array {self.name!r} is incomplete (sample {sample}, file "
                          f"{self.path(sample // self.shard_size)}: {what}); every sample is always written, so "
                          "the store is damaged or partly copied: copy it again, or rebuild the artifact")

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
        problem = shard_index_problem(index, 0, st.st_size - self.index_nbytes, self.chunk_lengths)
        if problem is not None:
            entry, what = problem
            raise self._corrupt(shard, f"shard index entry {entry}: {what}")
        self._indexes[shard] = (stamp, index)
        return index

    def read(self, idx: np.ndarray, dtype: DTypeLike | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Samples ``idx`` (in range; any order, repeats allowed) as ``[k, *sample_shape]`` in ``dtype``
        (default: the stored one; another is cast chunk by chunk while the chunk is in cache), into
        ``out`` when given (C-contiguous, of that shape; its dtype wins)."""
        if out is None:
            out = np.empty((len(idx), *self.sample_shape), dtype=self.dtype if dtype is None else dtype)
        if len(idx) == 0:
            return out
        if len(idx) == 1 and self.codec is None:
            self._read_one(int(idx[0]), out)
            return out
        order = np.argsort(idx, kind="stable") if len(idx) > 1 else np.zeros(1, dtype=np.int64)
        ordered = idx[order]
        shards = ordered // self.shard_size
        bounds = [0, *(np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist(), len(idx)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
            self._read_shard(int(shards[lo]), ordered[lo:hi], order[lo:hi], out)
        return out

    def _open(self, shard: int, sample: int) -> int:
        """A descriptor of shard file ``shard`` (a missing file is an error naming ``sample``)."""
        path = self._paths.get(shard)
        if path is None:
            path = self._paths.setdefault(shard, str(self.path(shard)))
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._missing(sample, "shard file missing") from None

    def _bad_chunk(self, sample: int, truncated: bool) -> InputError:
        return self._corrupt(sample // self.shard_size, "truncated chunk" if truncated else "chunk checksum mismatch",
                             sample)

    def _read_one(self, sample: int, out: np.ndarray) -> None:
        """Raw ``sample`` into ``out[0]``: a consumer's random single-sample read, with little Python around
        the ``preadv`` (on a read from disk, CPU work before or after the wait adds to its latency)."""
        shard = sample // self.shard_size
        fd = self._open(shard, sample)
        try:
            offset = int(self._index(fd, shard)[sample - shard * self.shard_size, 0])
            if offset == _EMPTY:
                raise self._missing(sample, "empty shard index entry: no chunk stored")
            cast = out.dtype != self.dtype
            target = self._scratch(self.nbytes) if cast else out.reshape(-1).view(np.uint8)
            crc = bytearray(4)
            got = os.preadv(fd, [target, crc], offset)
        finally:
            os.close(fd)
        if got < self.nbytes + 4 or _crc(target) != crc:
            raise self._bad_chunk(sample, truncated=got < self.nbytes + 4)
        if cast:
            cast_into(out.reshape(-1), target.view(self.dtype))

    def _read_shard(self, shard: int, samples: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        fd = self._open(shard, int(samples[0]))
        try:
            if 2 * len(samples) > self.shard_size:  # most of the file: let the kernel read further ahead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            index = self._index(fd, shard)
            local = samples - shard * self.shard_size
            offsets, lengths = index[local, 0].tolist(), index[local, 1].tolist()
            if _EMPTY in offsets:
                raise self._missing(int(samples[offsets.index(_EMPTY)]), "empty shard index entry: no chunk stored")
            limit = self.run_samples if self.codec is None else _IOV_MAX
            start = 0
            while start < len(samples):  # runs of chunks stored back to back
                stop = start + 1
                while (stop < len(samples) and stop - start < limit
                       and offsets[stop] == offsets[stop - 1] + lengths[stop - 1]):
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
        span = offsets[-1] + lengths[-1] - offsets[0]
        if self.codec is None:  # raw chunks (lengths checked with the index): read straight into the output
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
                    raise self._bad_chunk(int(samples[j]), truncated=got < span)
            if cast:
                values = target.view(self.dtype).reshape(len(rows), *self.sample_shape)
                for j, row in enumerate(rows):
                    cast_into(out[row], values[j])
            return
        data = memoryview(os.pread(fd, span, offsets[0]))
        pos = 0
        for j, row in enumerate(rows):
            chunk = data[pos:pos + lengths[j]]
            pos += lengths[j]
            sample = int(samples[j])
            if len(chunk) < 4 or _crc(chunk[:-4]) != chunk[-4:]:
                raise self._bad_chunk(sample, truncated=len(chunk) < lengths[j])
            cast = out.dtype != self.dtype
            target = self._scratch(self.nbytes) if cast else out[row]
            problem = decode_capped(self.codec, chunk[:-4], target)
            if problem is not None:
                raise self._corrupt(sample // self.shard_size, problem, sample)
            if cast:
                cast_into(out[row], target.view(self.dtype).reshape(self.sample_shape))

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
