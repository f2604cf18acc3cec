"""Creating and writing token stores: :func:`create_token_store`, :func:`write_shard` (inputs validated, NaN/inf
refused, everything encoded before anything is written) and the cache of opened writers, per store path."""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import ArrayLike, DTypeLike

from pipeline.errors import ConfigError, InputError
from stages.store.fastpath import (
    _has_non_finite,
    _ids_chunk,
    _ShardFile,
    _write_atomic,
    fast_path_unsupported_reason,
)
from stages.store.layout import (
    _META_KEY,
    _SAMPLE_ARRAYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    StoreLike,
    _check_layout,
    _compressors,
    _context,
    _describe,
    _local_root,
    _metadata_stamp,
    _writable_group,
    shard_ranges,
)

_WRITE_CONFIG = {"write_empty_chunks": True}
"""zarr-python writes every chunk, as the fast path does (identical bytes, a checksum for every sample)."""


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
    size are unwritten (reading one is an error) until their shards are written.
    """
    group = _writable_group(store)
    if n < 0:
        raise ConfigError(f"token store size n={n} is invalid: must be >= 0")
    for name in _SAMPLE_ARRAYS:
        if name in group:
            arr = group[name]
            arr.resize((n, *arr.shape[1:]))


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
