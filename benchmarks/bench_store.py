"""Token store I/O: zarr write MB/s ÷ ``numpy.save`` of the same arrays (goal ≥ 0.5), random reads.

Data: ViT-S/8-at-224 shaped tokens (28×28×384 float16, Gaussian with per-channel scales, which hardly
compress, like real tokens) plus blocky 224×224 int16 labels; ``N`` = 512 samples (quick: 64).
Writes go to a temp folder (page cache, no fsync, for both sides); best of 3, interleaved.
Reads: one random sample's tokens, a random 32-sample training batch (as kNN partners are read),
and a full sequential stream, each against the same read from a memory-mapped ``.npy``.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, script_main, temp_root, timed

GRID = (28, 28)
DIM = 384
LABEL_HW = (224, 224)
BATCH = 32


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.2, 3.0, size=DIM).astype(np.float32)
    tokens = (rng.standard_normal((n, *GRID, DIM), dtype=np.float32) * scales).astype(np.float16)
    blocks = rng.integers(-1, 27, size=(n, LABEL_HW[0] // 28, LABEL_HW[1] // 28), dtype=np.int16)
    labels = np.repeat(np.repeat(blocks, 28, axis=1), 28, axis=2)
    return tokens, labels, [f"s{i:06d}" for i in range(n)]


def _write_store(path: Path, tokens: np.ndarray, labels: np.ndarray, ids: list[str], shard_size: int) -> None:
    from stages.store import create_token_store, shard_ranges, write_shard

    group = create_token_store(path, n=len(tokens), grid=GRID, dim=DIM, label_hw=LABEL_HW, shard_size=shard_size,
                               with_rgb=False, with_flip=False, attrs={"bench": True})
    for k, (a, b) in enumerate(shard_ranges(len(tokens), shard_size)):
        write_shard(group, k, tokens=tokens[a:b], labels=labels[a:b], ids=ids[a:b])


def _write_npy(path: Path, tokens: np.ndarray, labels: np.ndarray) -> None:
    path.mkdir()
    np.save(path / "tokens.npy", tokens)
    np.save(path / "labels.npy", labels)


def _best_write(fn: Any, scratch: Path, repeat: int) -> float:
    """Best wall seconds of ``fn(fresh_path)``; each output is removed untimed."""
    best = float("inf")
    for i in range(repeat):
        path = scratch / f"w{i}"
        start = time.perf_counter()
        fn(path)
        best = min(best, time.perf_counter() - start)
        shutil.rmtree(path)
    return best


def _median_ms(fn: Any, picks: np.ndarray) -> float:
    times = []
    for i in picks:
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def run(quick: bool = False) -> list[dict[str, Any]]:
    from stages.store import open_token_store

    n, shard_size, repeat = (64, 16, 2) if quick else (512, 64, 3)
    tokens, labels, ids = _data(n)
    mb = (tokens.nbytes + labels.nbytes) / 1e6
    sample_mb = tokens[0].nbytes / 1e6
    rng = np.random.default_rng(1)
    rows = []
    with temp_root("stegopipe-bench-store-") as scratch:
        zarr_s = npy_s = float("inf")
        for _ in range(repeat):  # interleaved, so both sides see the same interference
            zarr_s = min(zarr_s, _best_write(lambda p: _write_store(p, tokens, labels, ids, shard_size), scratch, 1))
            npy_s = min(npy_s, _best_write(lambda p: _write_npy(p, tokens, labels), scratch, 1))
        rows.append(row("store write (tokens+labels)", mb / zarr_s, "MB/s", baseline=mb / npy_s, goal=">= 0.5",
                        note=f"zarr token store (raw fp16 tokens, lz4 labels, shards of {shard_size}) ÷ numpy.save of "
                             f"the same {mb:.0f} MB ({n} samples); ratio = ours/baseline; best of {repeat}"))

        _write_store(scratch / "store", tokens, labels, ids, shard_size)
        _write_npy(scratch / "npy", tokens, labels)
        store = open_token_store(scratch / "store")
        mm = np.load(scratch / "npy" / "tokens.npy", mmap_mode="r")
        store.get_tokens([0])  # open the arrays once

        picks = rng.integers(0, n, size=50)
        ours_ms = _median_ms(lambda i: store.get_tokens([i]), picks)
        base_ms = _median_ms(lambda i: np.asarray(mm[i], dtype=np.float32), picks)
        rows.append(row("random read, 1 sample's tokens", ours_ms, "ms", baseline=base_ms, higher_is_better=False,
                        note=f"{sample_mb:.2f} MB fp16 → float32, median of 50; baseline: memory-mapped .npy "
                             "(page cache); ratio = baseline/ours"))

        batches = [np.sort(rng.choice(n, size=min(BATCH, n), replace=False)) for _ in range(10 if quick else 20)]
        ours_b = _median_ms(lambda k: store.get_tokens(batches[k]), np.arange(len(batches)))
        base_b = _median_ms(lambda k: mm[batches[k]].astype(np.float32), np.arange(len(batches)))
        rows.append(row(f"training batch read ({min(BATCH, n)} random samples)", ours_b, "ms", baseline=base_b,
                        higher_is_better=False,
                        note=f"{min(BATCH, n) * sample_mb:.1f} MB per batch, median; baseline: memory-mapped .npy "
                             "fancy index; ratio = baseline/ours"))

        def stream() -> None:
            for _ in store.iter_batches(64, tokens_dtype=np.float16):
                pass

        stream_s = timed(stream, repeat=repeat)
        npy_stream_s = timed(lambda: np.load(scratch / "npy" / "tokens.npy"), repeat=repeat)
        rows.append(row("sequential token stream", tokens.nbytes / 1e6 / stream_s, "MB/s",
                        baseline=tokens.nbytes / 1e6 / npy_stream_s,
                        note="TokenStore.iter_batches (shard prefetch, fp16) ÷ numpy.load of the .npy; "
                             "ratio = ours/baseline"))
    return rows


if __name__ == "__main__":
    script_main(run)
