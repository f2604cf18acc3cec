"""Reading token stores: :class:`TokenStore` (random access by sample, streaming in order) over the fast
path where it applies, else zarr-python."""
from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import ArrayLike, DTypeLike
from zarr.core.sync import sync

from pipeline.errors import ConfigError, InputError
from pipeline.prefetch import prefetch
from stages.store.fallback import FallbackCheck
from stages.store.fastpath import _ShardFile, fast_path_unsupported_reason
from stages.store.layout import _META_KEY, _check_layout, _context, _local_root, _metadata_stamp, shard_ranges


def _read_runs(arr: zarr.Array, runs: list[tuple[int, int]]) -> list[np.ndarray]:
    """Read sample runs ``[a, b)`` concurrently on zarr's event loop (faster than one blocking read
    per run for random batches; bench_store measures it). Uses zarr 3.1's ``Array._async_array`` (pinned version)."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*(arr._async_array.getitem((slice(a, b),)) for a, b in runs))

    return [np.asarray(part) for part in sync(gather())]


def _meta_property(key: str, doc: str) -> Any:
    """A read-only :class:`TokenStore` property: its metadata's ``key`` (checked at open), an int or a tuple of ints."""

    def value(self: TokenStore) -> int | tuple[int, ...]:
        item = self._meta[key]
        return tuple(int(v) for v in item) if isinstance(item, list) else int(item)

    return property(value, doc=doc)


class TokenStore:
    """Read-only view of a token store (open with :func:`open_token_store` or :func:`open_tokens`).

    Arrays and metadata are opened once. Reads of per-sample arrays use the direct shard reader where
    :func:`fast_path_unsupported_reason` allows (see :attr:`fast_path`), else zarr-python; either way
    every chunk's checksum is checked, and corruption raises :class:`InputError` naming the store, the
    array and the sample (or the samples / shard read).
    """

    def __init__(self, path: str | os.PathLike[str], group: zarr.Group | None = None) -> None:
        """``path``: a local store folder; or, with ``group`` (a store opened elsewhere, e.g. at a URL by
        :mod:`stages.store.remote`), the label that names it in messages."""
        self.path = str(path)
        if group is None:
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
        self._fallback = {name: FallbackCheck(arr, name, where) for name, arr in self._opened.items()
                          if name not in self._direct}

    @property
    def n(self) -> int:
        """Number of samples."""
        return self._n

    grid = _meta_property("grid", "Token grid ``(h, w)``.")
    dim = _meta_property("dim", "Token dimension ``D``.")
    label_hw = _meta_property("label_hw", "Label / rgb size ``(H, W)``.")
    shard_size = _meta_property("shard_size", "Samples per shard.")

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
        self._fallback["ids"].require_all()
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

    def get(self, name: str, indices: ArrayLike, dtype: DTypeLike | None = None, *,
            out: np.ndarray | None = None) -> np.ndarray:
        """Samples ``indices`` (any order, repeats allowed) of array ``name``, in the stored dtype or ``dtype``.

        Only the chunks of the requested samples are read and decoded. ``out`` (C-contiguous, of shape
        ``[k, *sample shape]``; its dtype is the one returned) receives them instead of a new array: a
        loop reusing one buffer (or a pinned one) saves the allocation and its page faults.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        # one sample (a consumer's random read): a scalar check, cheaper than numpy's two reductions
        in_range = (0 <= int(idx[0]) < self._n if idx.size == 1
                    else idx.size == 0 or (idx.min() >= 0 and idx.max() < self._n))
        if not in_range:
            raise InputError(
                f"token store {self.path}: sample indices must lie in [0, {self.n}), got min {idx.min()} max {idx.max()}"
            )
        if out is not None:
            shape = (idx.size, *self._array(name).shape[1:])
            flags = out.flags
            if out.shape != shape or not flags.c_contiguous or not flags.writeable:
                raise ConfigError(f"token store {self.path}: out= must be a writeable C-contiguous array of shape "
                                  f"{shape}, got {out.shape}")
            if dtype is not None and np.dtype(dtype) != out.dtype:
                raise ConfigError(f"token store {self.path}: dtype={np.dtype(dtype)} but out= is {out.dtype}")
        direct = self._direct.get(name)
        if direct is not None:
            return direct.read(idx, dtype, out)
        values = self._get_zarr(name, idx)
        if out is not None:
            out[...] = values
            return out
        return values if dtype is None else values.astype(dtype, copy=False)

    def _get_zarr(self, name: str, idx: np.ndarray) -> np.ndarray:
        """:meth:`get` through zarr-python."""
        arr = self._array(name)
        if idx.size == 0:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        # Read runs of consecutive samples with basic slices, concurrently: zarr's orthogonal (fancy)
        # selection is much slower here, and a slice of a sharded array decodes only the chunks (samples)
        # it covers. Sorted, so shard files are visited in order and neighbours merge into one run.
        uniq, inverse = np.unique(idx, return_inverse=True)
        self._fallback[name].require(uniq)
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

        Each batch is read by :meth:`get` straight into its arrays, two batches at a time in background
        threads (one checksums and casts while the other waits on the disk; a shard file read mostly whole
        is read with ``POSIX_FADV_SEQUENTIAL``, the kernel's larger read-ahead); the last one may be short.
        Token arrays are cast to ``tokens_dtype`` (float32 by default; None: as stored). A batch's arrays
        are reused for a later batch once nothing references them any more (:class:`_Recycled`), so a
        consumer keeping a batch (or a view of it) keeps its values, and one dropping it saves the
        allocation's page faults.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid: must be a positive integer")
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise InputError(f"token store {self.path}: range [{start}, {stop}) is not within [0, {self.n}]")
        dtypes = {name: np.dtype(tokens_dtype if name.startswith("tokens") and tokens_dtype is not None
                                 else self._array(name).dtype) for name in arrays}
        shapes = {name: tuple(self._array(name).shape[1:]) for name in dtypes}
        buffers = _Recycled(keep=4 * len(dtypes))  # two being read, one with the consumer, one being dropped

        def read(a: int) -> dict[str, np.ndarray]:
            index = np.arange(a, min(a + batch_size, stop), dtype=np.int64)
            out = {name: self.get(name, index, out=buffers.take((len(index), *shapes[name]), dtype))
                   for name, dtype in dtypes.items()}
            out["index"] = index
            return out

        with prefetch(read, range(start, stop, batch_size), workers=2, name="store-stream") as batches:
            yield from batches

    def dask_tokens(self, flatten: bool = True, *, flip: bool = False):  # -> dask.array.Array
        """Lazy float16 dask array of tokens, one dask chunk per shard.

        ``flatten=True`` gives ``[N*h*w, D]`` (rows sample-major, then grid row, then column), else
        ``[N,h,w,D]``. Each task opens the store by path or URL (once per process) and reads its shard
        through :meth:`get`, with every check of a read, so tasks can run on other Dask workers.
        """
        import dask
        import dask.array as da

        name = "tokens_flip" if flip else "tokens"
        self._array(name)
        h, w = self.grid
        stamp = _metadata_stamp(Path(self.path)) if _local_root(self._opened[name]) is not None else None
        blocks = [da.from_delayed(dask.delayed(_read_samples)(self.path, stamp, name, a, b),
                                  shape=(b - a, h, w, self.dim), dtype=np.float16) for a, b in self.shard_ranges()]
        arr = da.concatenate(blocks) if blocks else da.zeros((0, h, w, self.dim), dtype=np.float16)
        return arr.reshape(self.n * h * w, self.dim) if flatten else arr


@lru_cache(maxsize=8)
def _opened(ref: str, stamp: tuple[Any, ...] | None) -> TokenStore:
    """The store at ``ref``, opened once per process while its metadata (``stamp``, local stores) is unchanged."""
    from stages.store.artifact import open_tokens  # the artifact module imports this one

    return open_tokens(ref)


def _read_samples(ref: str, stamp: tuple[Any, ...] | None, name: str, a: int, b: int) -> np.ndarray:
    """Samples ``[a, b)`` of array ``name`` of the store at ``ref`` (a dask task of :meth:`TokenStore.dask_tokens`)."""
    return _opened(ref, stamp).get(name, np.arange(a, b))


class _Recycled:
    """Arrays handed out by :meth:`take` and taken back once only this pool references them (CPython's
    reference count: a consumer's array, a view of it or a tensor sharing its memory all hold a reference),
    up to ``keep`` of them; thread-safe."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` (contents undefined) that no one else references."""
        with self._lock:
            for array in self._arrays:  # referenced here by the list, ``array`` and getrefcount's argument
                if sys.getrefcount(array) == 3 and array.shape == shape and array.dtype == dtype:
                    return array
            array = np.empty(shape, dtype=dtype)
            if len(self._arrays) < self._keep:
                self._arrays.append(array)
            return array


def open_token_store(path: str | os.PathLike[str]) -> TokenStore:
    """Open a token store read-only; :class:`InputError` naming the path if it is missing or malformed."""
    return TokenStore(path)
