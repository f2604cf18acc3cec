"""Interop with stego-studies' Squirrel feature stores (method.md §10.2).

A Squirrel ``MessagepackDriver`` store is a folder of ``{key}.gz`` shards, each a gzip stream of
msgpack(-numpy) records, one record per sample::

    ind         int64   [1]            sample index
    img         float32 [1,3,H,W]      image normalised with the ImageNet mean/std
    label       int64   [1,H,W]        -1 = ignore
    dino_feats  float32 [1,D,h,w]      backbone tokens, channels first

plus ``status.txt`` (``WRITING`` / ``SUCCESS``). :func:`export_squirrel` writes this schema from a token
store (shard keys ``000000``, ``000001``, ... in store order) and a ``stegopipe.json`` sidecar with the
sample ids and store attributes, which Squirrel readers ignore (they read ``*.gz`` only).
Reading never goes through msgpack-numpy (which unpickles object arrays, i.e. runs code from the
file): :func:`read_shard` decodes its array maps itself and accepts only plain bool/int/float/complex
arrays whose dtype, shape and buffer length agree.
:func:`import_squirrel` builds a token store from such a folder in one streaming pass: rows follow the
sorted shard keys and the record order inside each shard (the write order; stego-studies shuffled its
train stores, so ``ind`` is then not the row number), ids come from the sidecar when present, else
``str(ind)``.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import msgpack
import numpy as np

from pipeline.errors import InputError
from stages.datasets import transforms
from stages.store import (
    create_token_store,
    open_token_store,
    resize_token_store,
    write_shard,
)

IMAGENET_MEAN = np.array(transforms.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(transforms.IMAGENET_STD, dtype=np.float32)
SQUIRREL_SHARD_SIZE = 500
"""stego-studies' ``SHARD_SIZE``: samples per Squirrel shard."""
SIDECAR = "stegopipe.json"
STATUS = "status.txt"


def _driver(url: str) -> Any:
    """squirrel-core's MessagepackDriver (imported on use: the package is heavy and optional at import)."""
    from squirrel.driver import MessagepackDriver

    return MessagepackDriver(url)


@dataclass
class SquirrelExport:
    """What :func:`export_squirrel` wrote."""

    url: str
    n: int
    shards: int
    notes: list[str] = field(default_factory=list)


def normalize_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[k,H,W,3]`` → float32 ``[k,3,H,W]`` ImageNet-normalised (the ``img`` of the schema)."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)


def denormalize_img(img: np.ndarray) -> np.ndarray:
    """float32 ``[k,3,H,W]`` ImageNet-normalised → uint8 ``[k,H,W,3]`` (rounded, clipped)."""
    x = img.transpose(0, 2, 3, 1).astype(np.float32) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def export_squirrel(
    token_store_path: str | os.PathLike[str], url: str, *, shard_size: int = SQUIRREL_SHARD_SIZE
) -> SquirrelExport:
    """Write a token store as a stego-studies Squirrel store at ``url`` (a new or empty folder / fsspec URL).

    ``img`` is derived from the store's ``rgb``; a store without ``rgb`` gets all-zero ``img`` and a note
    saying so. ``ind`` is the row number. Memory: one Squirrel shard of float32 samples at a time.
    """
    store = open_token_store(token_store_path)
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root) and fs.ls(root):
        raise InputError(f"squirrel store {url}: folder exists and is not empty; remove it or choose a new url")
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{STATUS}", b"WRITING")
    notes: list[str] = []
    if not store.has_rgb:
        notes.append(f"token store {store.path} has no 'rgb' array: 'img' was written as zeros")
    H, W = store.label_hw
    driver = _driver(url)
    arrays = ("tokens", "labels", "rgb") if store.has_rgb else ("tokens", "labels")
    shards = 0
    for shards, batch in enumerate(store.iter_batches(shard_size, arrays=arrays), start=1):
        k = len(batch["index"])
        feats = batch["tokens"].transpose(0, 3, 1, 2)  # [k,D,h,w] float32
        img = normalize_rgb(batch["rgb"]) if store.has_rgb else np.zeros((k, 3, H, W), dtype=np.float32)
        samples = [
            {
                "ind": batch["index"][i : i + 1].astype(np.int64),
                "img": np.ascontiguousarray(img[i : i + 1]),
                "label": batch["labels"][i : i + 1].astype(np.int64),
                "dino_feats": np.ascontiguousarray(feats[i : i + 1]),
            }
            for i in range(k)
        ]
        driver.store.set(samples, key=f"{shards - 1:06d}")
    sidecar = {"n": store.n, "ids": store.ids, "attrs": store.attrs, "has_rgb": store.has_rgb,
               "source": store.path}
    fs.pipe_file(f"{root}/{SIDECAR}", json.dumps(sidecar).encode())
    fs.pipe_file(f"{root}/{STATUS}", b"SUCCESS")
    return SquirrelExport(url=url, n=store.n, shards=shards, notes=notes)


class _UnsafeRecord(ValueError):
    """A record's array map is refused (raised inside the msgpack object hook)."""


_DTYPE = re.compile(r"^[<>|=]?[biufc][0-9]{1,2}$")
MAX_NDIM = 32
MAX_RECORD_BYTES = 256 << 20
"""The largest record :func:`read_shard` decodes (msgpack's buffer limit): a ViT-B/8 sample at 320 px with
its image and label is about 7 MB."""


def _decode_array(obj: dict[Any, Any]) -> Any:
    """msgpack object hook for msgpack-numpy's array maps (``{b"nd", b"type", b"kind", b"shape", b"data"}``).

    Accepts only plain numeric/bool dtypes given as a type string; checks dtype, shape and buffer length
    before building the array (read-only, a view of the record's bytes). Never unpickles. Other maps
    pass through unchanged.
    """
    if b"nd" not in obj:
        return obj
    kind, descr, data = obj.get(b"kind", b""), obj.get(b"type"), obj.get(b"data")
    if kind not in (b"", "") or not isinstance(descr, str) or not _DTYPE.match(descr):
        raise _UnsafeRecord(f"array of dtype {descr!r} (kind {kind!r}) refused: only plain bool, integer and "
                            f"float arrays are accepted (object, structured and void arrays are never decoded)")
    dtype = np.dtype(descr)
    if dtype.kind not in "biufc" or dtype.hasobject:
        raise _UnsafeRecord(f"array of dtype {descr!r} refused: not a plain numeric dtype")
    if not isinstance(data, bytes):
        raise _UnsafeRecord(f"array data is a {type(data).__name__}, expected bytes")
    if obj[b"nd"] is False:  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise _UnsafeRecord(f"scalar of dtype {descr} has {len(data)} bytes, expected {dtype.itemsize}")
        return np.frombuffer(data, dtype)[0]
    shape = obj.get(b"shape")
    if (obj[b"nd"] is not True or not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise _UnsafeRecord(f"array shape {shape!r} is not a list of at most {MAX_NDIM} non-negative integers")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise _UnsafeRecord(f"array of shape {tuple(shape)} and dtype {descr} needs {expected} bytes, "
                            f"its buffer holds {len(data)}")
    return np.frombuffer(data, dtype).reshape(shape)


def shard_keys(url: str) -> list[str]:
    """Sorted shard keys (``*.gz`` file names without the suffix) of the Squirrel store at ``url``."""
    fs, root = fsspec.core.url_to_fs(url)
    names = (str(name).rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(root, detail=False))
    return sorted(name[: -len(".gz")] for name in names if name.endswith(".gz"))


def read_shard(url: str, key: str) -> Iterator[Any]:
    """Yield the records of shard ``key`` of the Squirrel store at ``url``, decoded safely (see module
    docstring). A refused array, a corrupt stream or a truncated file raises :class:`InputError` naming
    the shard file and the record index."""
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/{key}.gz"
    count = 0  # records yielded so far: the index of the one being decoded
    try:
        with fs.open(path, mode="rb", compression="gzip") as handle:
            unpacker = msgpack.Unpacker(handle, object_hook=_decode_array, use_list=False, raw=False,
                                        max_buffer_size=MAX_RECORD_BYTES)
            for record in unpacker:
                yield record
                count += 1
            if unpacker.tell() != handle.tell():  # the stream ends inside a record
                raise EOFError(f"file ends {handle.tell() - unpacker.tell()} bytes into the record (truncated)")
    except msgpack.BufferFull:
        raise InputError(f"squirrel store {url}, shard file {path}, record {count}: larger than "
                         f"{MAX_RECORD_BYTES >> 20} MiB, the most a record may hold (MAX_RECORD_BYTES; msgpack's "
                         f"buffer limit)") from None
    except (msgpack.UnpackException, ValueError, EOFError, OSError, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or "no reason given"
        raise InputError(f"squirrel store {url}, shard file {path}, record {count}: {type(exc).__name__}: "
                         f"{reason}") from exc


def _check_sample(sample: Any, where: str, first: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """Validate one record against the schema (and the first record's shapes); return its shapes."""
    if not isinstance(sample, dict):
        raise InputError(f"{where}: record is a {type(sample).__name__}, expected a dict")
    for key in ("ind", "label", "dino_feats"):
        if key not in sample:
            raise InputError(f"{where}: record lacks {key!r} (has {', '.join(map(str, sample))})")
    present = [key for key in ("ind", "img", "label", "dino_feats") if key in sample]
    for key in present:
        value = sample[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            found = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
            raise InputError(f"{where}: {key!r} is a {found}, expected a bool, integer or float array")
    shapes = {key: tuple(sample[key].shape) for key in present}
    feats, label = shapes["dino_feats"], shapes["label"]
    if shapes["ind"] != (1,) or len(feats) != 4 or feats[0] != 1 or len(label) != 3 or label[0] != 1:
        raise InputError(f"{where}: shapes {shapes} do not match the schema ind [1], label [1,H,W], "
                         f"dino_feats [1,D,h,w]")
    if "img" in shapes and shapes["img"] != (1, 3, *label[1:]):
        raise InputError(f"{where}: 'img' has shape {shapes['img']}, expected {(1, 3, *label[1:])}")
    if first is not None and shapes != first:
        raise InputError(f"{where}: shapes {shapes} differ from the first record's {first}")
    return shapes


def import_squirrel(url: str, dest_path: str | os.PathLike[str], *, shard_size: int = SQUIRREL_SHARD_SIZE) -> str:
    """Build a token store at ``dest_path`` (must not exist) from the Squirrel store at ``url``.

    A failed import removes ``dest_path`` again. Tokens are stored float16, labels int16; ``rgb`` is recovered by un-normalising ``img`` when the records
    have it (and the exporter did not mark it as zeros). One streaming pass, one token-store shard of
    ``shard_size`` samples in memory. Returns ``dest_path``.
    """
    if Path(dest_path).exists():
        raise InputError(f"token store {dest_path}: path already exists; remove it or choose a new path")
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise InputError(f"squirrel store {url}: folder does not exist")
    if fs.exists(f"{root}/{STATUS}"):
        status = fs.cat_file(f"{root}/{STATUS}").decode().strip()
        if status != "SUCCESS":
            raise InputError(f"squirrel store {url}: {STATUS} says {status!r}, not 'SUCCESS' (a partial store); "
                             f"re-run the export")
    sidecar = json.loads(fs.cat_file(f"{root}/{SIDECAR}")) if fs.exists(f"{root}/{SIDECAR}") else None
    sidecar_ids = list(map(str, sidecar["ids"])) if sidecar and "ids" in sidecar else None
    keys = shard_keys(url)
    if not keys:
        raise InputError(f"squirrel store {url}: has no *.gz shards")

    first: dict[str, tuple[int, ...]] | None = None
    buf: dict[str, list[np.ndarray]] = {"tokens": [], "labels": [], "rgb": [], "ind": []}
    written = 0
    with_rgb = False

    def flush() -> None:
        nonlocal written
        k = len(buf["tokens"])
        if sidecar_ids is None:
            ids = [str(int(i)) for i in buf["ind"]]
        elif len(sidecar_ids) >= written + k:
            ids = sidecar_ids[written : written + k]
        else:
            raise InputError(f"squirrel store {url}: {SIDECAR} lists {len(sidecar_ids)} ids but the shards hold "
                             f"more records; the folder was modified after export")
        resize_token_store(dest_path, written + k)
        write_shard(
            dest_path, written // shard_size,
            tokens=np.stack(buf["tokens"]), labels=np.stack(buf["labels"]),
            rgb=denormalize_img(np.stack(buf["rgb"])) if with_rgb else None,
            ids=ids,
        )
        written += k
        for v in buf.values():
            v.clear()

    try:
        for key in keys:
            for j, sample in enumerate(read_shard(url, key)):
                where = f"squirrel store {url}, shard {key}.gz, record {j}"
                shapes = _check_sample(sample, where, first)
                if first is None:
                    first = shapes
                    _, D, h, w = shapes["dino_feats"]
                    with_rgb = "img" in shapes and (sidecar is None or bool(sidecar.get("has_rgb", True)))
                    attrs = dict(sidecar.get("attrs", {})) if sidecar else {}
                    attrs["imported_from"] = url
                    create_token_store(dest_path, n=0, grid=(h, w), dim=D, label_hw=shapes["label"][1:],
                                       shard_size=shard_size, with_rgb=with_rgb, with_flip=False, attrs=attrs)
                buf["tokens"].append(np.asarray(sample["dino_feats"][0]).transpose(1, 2, 0))
                buf["labels"].append(np.asarray(sample["label"][0]))
                buf["ind"].append(np.asarray(sample["ind"])[0])
                if with_rgb:
                    buf["rgb"].append(np.asarray(sample["img"][0]))
                if len(buf["tokens"]) == shard_size:
                    flush()
        if buf["tokens"]:
            flush()
        if first is None:
            raise InputError(f"squirrel store {url}: its shards hold no records")
        if sidecar_ids is not None and written != len(sidecar_ids):
            raise InputError(f"squirrel store {url}: {SIDECAR} lists {len(sidecar_ids)} ids but the shards hold "
                             f"{written} records; the folder was modified after export")
    except BaseException:
        shutil.rmtree(dest_path, ignore_errors=True)  # publish nothing half-built
        raise
    return str(dest_path)
