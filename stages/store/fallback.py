"""Checks for reads through zarr-python (a local store with another codec chain than the direct path's):
what zarr-python would read quietly or decode without a bound is refused first, naming the store, the
array, the sample and the file (:class:`FallbackCheck`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.sync import sync

from pipeline.errors import InputError
from stages.store.fastpath import (
    _EMPTY,
    _numcodec,
    declared_size,
    max_encoded_length,
    shard_index_nbytes,
    shard_index_problem,
)
from stages.store.layout import _local_root


def _chunk_lengths(sharding: ShardingCodec, nbytes: int) -> tuple[int, int]:
    """The allowed stored lengths of an inner chunk of ``nbytes`` (see :func:`shard_index_problem`)."""
    inner = tuple(sharding.codecs)
    crcs = sum(isinstance(c, Crc32cCodec) for c in inner)
    if all(isinstance(c, BytesCodec | Crc32cCodec) for c in inner):
        return (nbytes + 4 * crcs,) * 2
    if len(inner) - crcs == 2 and isinstance(inner[1], BloscCodec | ZstdCodec):
        return 1, max_encoded_length(nbytes, compressed=True) - 4 + 4 * crcs
    return 1, 2**64 - 1


def _sized_compressor(codecs: tuple[Any, ...]) -> tuple[Any, int] | None:
    """For a chunk codec chain ``[bytes, blosc | zstd, crc32c...]``: the compressor's numcodecs twin (its
    header declares the decoded size) and the bytes of checksums after it; else None."""
    if len(codecs) < 2 or not isinstance(codecs[1], BloscCodec | ZstdCodec):
        return None
    if not all(isinstance(c, Crc32cCodec) for c in codecs[2:]):
        return None
    return _numcodec(codecs[1]), 4 * (len(codecs) - 2)


class FallbackCheck:
    """What zarr-python would read quietly from a local store whose arrays it reads (other codec chains):
    a missing chunk or shard file, an empty shard index entry (both read as fill values), a shard index
    whose chunks lie outside the data, overlap (aliased samples) or have impossible lengths, and a blosc or
    zstd chunk whose header declares another decoded size than a chunk has (zarr-python would allocate what
    it declares). Each file is checked once, when a read first needs it. (Stores at a URL are checked by
    :mod:`stages.store.remote`.)"""

    def __init__(self, array: zarr.Array, name: str, where: str) -> None:
        self.array, self.name, self.where = array, name, where
        self.root = _local_root(array)
        codecs = tuple(array.metadata.codecs)
        self.sharding = codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
        self.file_samples = int((array.shards if self.sharding else array.chunks)[0])
        inner = tuple(self.sharding.chunk_shape) if self.sharding else tuple(array.chunks)
        self.chunk_nbytes = int(np.prod(inner)) * array.dtype.itemsize
        self.compressor = _sized_compressor(tuple(self.sharding.codecs) if self.sharding else codecs)
        self.unreadable: dict[int, dict[int, InputError]] = {}
        """Per file checked: its samples that must not be read (no chunk, a header claiming another size)
        and the error a read of each raises."""

    def key(self, part: int) -> str:
        return self.array.metadata.encode_chunk_key((part,) + (0,) * (self.array.ndim - 1))

    def _missing(self, sample: int, part: int, what: str) -> InputError:
        return InputError(f"{self.where}: array {self.name!r} is incomplete (sample {sample}, file "
                          f"{self.root / self.key(part)}: {what}); every sample is always written, so the store "
                          "is damaged or partly copied: copy it again, or rebuild the artifact")

    def require(self, samples: np.ndarray) -> None:
        """Check the files holding ``samples`` (sorted, unique); InputError naming the first problem."""
        if self.root is None:
            return
        parts = samples // self.file_samples
        for part, first in zip(*np.unique(parts, return_index=True), strict=True):
            part = int(part)
            if part not in self.unreadable:
                self.unreadable[part] = self._check_file(part, int(samples[first]))
            bad = self.unreadable[part]
            for sample in samples[parts == part].tolist() if bad else ():
                if sample in bad:
                    raise bad[sample]

    def _check_file(self, part: int, wanted: int) -> dict[int, InputError]:
        """Check file ``part`` (raising for the file as a whole) and return its samples that must not be
        read, with their errors (``wanted``: the first sample a read wants from it, named if the file is
        missing)."""
        first = part * self.file_samples
        path = self.root / self.key(part)
        if not path.is_file():
            raise self._missing(wanted, part, "chunk file missing" if self.sharding is None else "shard file missing")
        if self.sharding is None:
            bad = self._check_headers(path, [(0, path.stat().st_size)], [first])
            last = min(first + self.file_samples, int(self.array.shape[0]))
            return {sample: error for error in bad.values() for sample in range(first, last)}
        shard_shape = tuple(self.array.shards)
        inner = tuple(self.sharding.chunk_shape)
        per_shard = tuple(s // c for s, c in zip(shard_shape, inner, strict=True))
        try:
            index = sync(self.sharding._load_shard_index_maybe(self.array.store_path / self.key(part), per_shard))
        except Exception as exc:  # zarr raises ValueError/RuntimeError for a bad index (crc32c, size)
            raise InputError(f"{self.where}: array {self.name!r} is corrupt (shard {part}, file {path}: shard "
                             f"index unreadable: {exc}); run `stegopipe verify` and rebuild the artifact") from exc
        size, index_nbytes = path.stat().st_size, shard_index_nbytes(self.sharding, shard_shape)
        at_end = self.sharding.index_location == ShardingCodecIndexLocation.end
        entries = index.offsets_and_lengths.reshape(-1, 2)
        problem = shard_index_problem(entries, 0 if at_end else index_nbytes, size - index_nbytes if at_end else size,
                                      _chunk_lengths(self.sharding, self.chunk_nbytes))
        if problem is not None:
            raise InputError(f"{self.where}: array {self.name!r} is corrupt (shard {part}, file {path}: shard index "
                             f"entry {problem[0]}: {problem[1]}); run `stegopipe verify` and rebuild the artifact")
        stored = [(j, int(o), int(n)) for j, (o, n) in enumerate(entries.tolist()) if o != _EMPTY]
        per_row = entries.shape[0] // per_shard[0]  # index entries per step of inner[0] samples
        bad = self._check_headers(path, [(o, n) for _, o, n in stored],
                                  [first + j // per_row * inner[0] for j, _, _ in stored])
        empty = (index.offsets_and_lengths[..., 0] == _EMPTY).reshape(per_shard[0], -1).any(axis=1)
        stored = min(self.file_samples, int(self.array.shape[0]) - first)
        for j in np.flatnonzero(np.repeat(empty, inner[0])[:stored]).tolist():
            bad.setdefault(first + j, self._missing(first + j, part, "empty shard index entry: no chunk stored"))
        return bad

    def _check_headers(self, path: Path, spans: list[tuple[int, int]], samples: list[int]) -> dict[int, InputError]:
        """The samples (``samples[k]``: of the chunk at ``spans[k] = (offset, length)`` in ``path``) whose
        compressed chunk's header declares another decoded size than :attr:`chunk_nbytes`, with their errors."""
        bad: dict[int, InputError] = {}
        if self.compressor is None:
            return bad
        codec, crc_bytes = self.compressor
        with open(path, "rb") as handle:
            for k, (offset, length) in enumerate(spans):
                handle.seek(offset)
                size = declared_size(codec, handle.read(min(length - crc_bytes, 32)), length - crc_bytes)
                if size != self.chunk_nbytes:
                    claim = "no decoded size" if size is None else f"{size} bytes"
                    bad[samples[k]] = InputError(
                        f"{self.where}: array {self.name!r} is corrupt (sample {samples[k]}, file {path}: "
                        f"{codec.codec_id} header declares {claim}, expected {self.chunk_nbytes}); run `stegopipe "
                        "verify` and rebuild the artifact")
        return bad

    def require_all(self) -> None:
        """Every file of the array present (listed once, so a claimed size far beyond the files fails fast)."""
        if self.root is None:
            return
        parts = -(-int(self.array.shape[0]) // self.file_samples)
        keys = {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}
        for part in range(min(parts, len(keys) + 1)):
            if self.key(part) not in keys:
                raise self._missing(part * self.file_samples, part, "chunk file missing")
        self.require(np.arange(0, min(parts, len(keys)) * self.file_samples, self.file_samples))
