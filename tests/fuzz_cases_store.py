"""Fuzz cases (:mod:`tests.fuzzing`) for the token store readers: shard files of each codec chain, shard
indexes alone, ids chunks and ``zarr.json`` (group and array), read through :class:`TokenStore` on the
direct path and (a shard index at the start, which the direct path declines) through zarr-python."""
from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.fuzzing import FuzzCase, fuzz_case

N, GRID, DIM, LHW, SHARD = 6, (2, 3), 4, (32, 32), 3
INDEX_NBYTES = 16 * SHARD + 4


def _build(path: Path, *, index_at_start: bool = False) -> None:
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    from stages.store import create_token_store, shard_ranges, write_shard

    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(-1, 27, (N, 4, 1)), LHW[0] // 4, axis=1).repeat(LHW[1], axis=2)
    group = create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=LHW, shard_size=SHARD, with_rgb=True,
                               with_flip=False)
    if index_at_start:  # the direct path declines them: zarr-python reads tokens and rgb
        for name, sample, dtype, inner in (("tokens", (*GRID, DIM), "float16", []),
                                           ("rgb", (*LHW, 3), "uint8", [ZstdCodec(level=1)])):
            del group[name]
            sharding = ShardingCodec(chunk_shape=(1, *sample), codecs=[BytesCodec(), *inner, Crc32cCodec()],
                                     index_location="start")
            group.create_array(name, shape=(N, *sample), dtype=dtype, chunks=(SHARD, *sample), serializer=sharding,
                               compressors=None, fill_value=0)
    for k, (a, b) in enumerate(shard_ranges(N, SHARD)):
        write_shard(path, k, tokens=rng.standard_normal((b - a, *GRID, DIM)), labels=labels[a:b],
                    rgb=rng.integers(0, 256, (b - a, *LHW, 3)), ids=[f"img{i}" for i in range(a, b)])


def _read_all(path: Path) -> dict[str, Any]:
    """Every array of every sample (float32 tokens too, the cast path; and the stream, whose arrays are
    reused once dropped), and the ids."""
    from stages.store import open_token_store

    store = open_token_store(path)
    every = np.arange(store.n)
    out: dict[str, Any] = {name: store.get(name, every) for name in store.arrays if name != "ids"}
    out["tokens32"] = store.get_tokens(every[::-1])
    out["stream"] = [{name: v.copy() for name, v in batch.items()}
                     for batch in store.iter_batches(2, arrays=[name for name in store.arrays if name != "ids"])]
    out["ids"] = store.ids
    return out


def _max_bytes() -> int:
    h, w = GRID
    return N * (h * w * DIM * (2 + 4) + LHW[0] * LHW[1] * (2 + 3))


def _store_case(workdir: Path, name: str, member: str, *, index_at_start: bool = False,
                cut: Callable[[bytes], tuple[bytes, bytes]] | None = None) -> FuzzCase:
    """Fuzz the file ``member`` of a small store (or, with ``cut``, the part of it ``cut`` splits off the end:
    ``cut(file) -> (kept, fuzzed)``)."""
    original_store = workdir / f"{name}.zarr"
    _build(original_store, index_at_start=index_at_start)
    whole = (original_store / member).read_bytes()
    kept, fuzzed = cut(whole) if cut is not None else (b"", whole)

    def write(folder: Path, data: bytes) -> Path:
        store = folder / "t.zarr"
        shutil.copytree(original_store, store, copy_function=os.link)  # the unmutated files shared
        (store / member).unlink()
        (store / member).write_bytes(kept + data)
        return store

    return FuzzCase(name, fuzzed, write, _read_all, expected=_read_all(original_store), max_bytes=_max_bytes())


def _index_at_end(data: bytes) -> tuple[bytes, bytes]:
    return data[:-INDEX_NBYTES], data[-INDEX_NBYTES:]


# (case name, the store file fuzzed, _store_case options): what each case reads
_CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("store-shard-tokens", "tokens/c/1/0/0/0", {}),  # a raw float16 tokens shard (chunks, crc32cs, index), direct
    ("store-shard-labels", "labels/c/0/0/0", {}),  # a blosc-lz4 labels shard, direct (decodes capped)
    ("store-shard-rgb", "rgb/c/1/0/0/0", {}),  # a zstd rgb shard, direct (decodes capped)
    # a shard index alone (offsets, lengths, its crc32c): aliasing, bounds, overflow; fixed and variable lengths
    ("store-index-tokens", "tokens/c/0/0/0/0", {"cut": _index_at_end}),
    ("store-index-rgb", "rgb/c/0/0/0/0", {"cut": _index_at_end}),
    # shards with their index at the start, read through zarr-python (the fallback's checks, zstd headers
    # checked before it decodes)
    ("store-shard-zarr-python", "tokens/c/1/0/0/0", {"index_at_start": True}),
    ("store-shard-zarr-python-zstd", "rgb/c/0/0/0/0", {"index_at_start": True}),
    ("store-ids-chunk", "ids/c/1", {}),  # an ids chunk (vlen UTF-8 + crc32c)
    ("store-zarr-json-group", "zarr.json", {}),  # the store's own metadata: format, shard size, grid, dim, sizes
    ("store-zarr-json-array", "rgb/zarr.json", {}),  # shape, chunk and shard shapes, codecs, fill value
)
for _name, _member, _options in _CASES:
    fuzz_case(_name)(functools.partial(_store_case, name=_name, member=_member, **_options))
