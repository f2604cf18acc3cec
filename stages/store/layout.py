"""The token store's on-disk layout: format name and version, per-array codecs, shard ranges, and the
check that an opened group is a token store of this version (shapes, dtypes, arrays present)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from pipeline.errors import ConfigError, InputError

FORMAT_NAME = "stegopipe.tokens"
FORMAT_VERSION = 2
"""2: a crc32c on every chunk of labels, rgb and ids too; every sample's chunk is stored."""
_META_KEY = "stegopipe"
_SAMPLE_ARRAYS = ("tokens", "tokens_flip", "labels", "rgb", "ids")
MAX_SAMPLE_BYTES = 1 << 30
"""The largest sample a store may declare in any array (a ViT-B/8 at 448 px is 4.8 MB of tokens): metadata
claiming more is refused at open, before anything is allocated."""
_ARTIFACT_DIR = re.compile(r"^(?P<stage>[a-z][a-z0-9_-]*)-[0-9a-f]{16}$")

StoreLike = str | os.PathLike[str] | zarr.Group


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


def _positive_ints(value: Any, count: int) -> bool:
    items = value if isinstance(value, list) else [value]
    return len(items) == count and all(type(v) is int and v > 0 for v in items)


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
    for key, count in (("shard_size", 1), ("grid", 2), ("dim", 1), ("label_hw", 2)):
        if not _positive_ints(meta[key], count):
            raise InputError(f"token store {where}: metadata {_META_KEY!r}.{key} is {meta[key]!r}, expected "
                             + ("a positive integer" if count == 1 else f"{count} positive integers"))
    h, w = meta["grid"]
    H, W = meta["label_hw"]
    D = meta["dim"]
    for name, nbytes in (("tokens", 2 * h * w * D), ("labels", 2 * H * W), ("rgb", 3 * H * W)):
        if nbytes > MAX_SAMPLE_BYTES:
            raise InputError(f"token store {where}: metadata {_META_KEY!r} gives {name} samples of {nbytes} bytes, "
                             f"more than the {MAX_SAMPLE_BYTES >> 20} MiB a sample may have (damaged metadata?)")
    try:
        arrays = {name: node for name, node in group.arrays() if name in _SAMPLE_ARRAYS}
    except Exception as exc:  # zarr raises many types (JSON, key, type, value errors) for bad array metadata
        raise InputError(f"token store {where}: an array's zarr.json is malformed ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from exc
    arrays = {name: arrays[name] for name in _SAMPLE_ARRAYS if name in arrays}
    for name in _SAMPLE_ARRAYS:  # a damaged zarr.json must not make an array look absent
        key = f"{group.path}/{name}/zarr.json".lstrip("/")
        if name not in arrays and sync(group.store.exists(key)):
            raise InputError(f"token store {where}: {name}/zarr.json is not the metadata of a Zarr v3 array")
    for name, arr in arrays.items():
        if min(arr.chunks) < 1 or (arr.shards is not None and arr.shards[0] != meta["shard_size"]):
            raise InputError(f"token store {where}: array {name!r} has chunks {arr.chunks} and shards {arr.shards}, "
                             f"expected positive chunks and shards of {meta['shard_size']} samples")
    for name in ("tokens", "labels", "ids"):
        if name not in arrays:
            raise InputError(f"token store {where}: array {name!r} is missing")
    n = arrays["tokens"].shape[0]
    expected = {
        "tokens": ((n, h, w, D), np.dtype("float16")),
        "tokens_flip": ((n, h, w, D), np.dtype("float16")),
        "labels": ((n, H, W), np.dtype("int16")),
        "rgb": ((n, H, W, 3), np.dtype("uint8")),
    }
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
