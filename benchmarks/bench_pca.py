"""Out-of-core PCA (``stages.reduce``): fit speed vs scikit-learn, memory vs N, transform vs read.

Data: seeded tokens with a rank-32 signal plus per-channel noise of decaying scale (well separated
leading eigenvalues, float16 in a token store of 16×16×384 samples, shards of 64 samples) written to a
temp folder (page cache). Rows:

* PCA fit tokens/s: the reduce stage's fit (``fit_moments`` on the CPU default backend, Dask threads,
  reading the float16 store from disk, then ``PCAProjection.from_moments``) vs scikit-learn
  ``StandardScaler`` + ``PCA(svd_solver="full")`` on the same tokens already in memory (float64, not
  timed to load). ``N`` = 131,072 tokens (quick: 32,768). Ours best of 2 after a warm-up, sklearn once.
  Goal ≥ 3×.
* PCA results equal: the largest relative difference of the explained-variance ratios (components
  holding ≥ 1e-6 of the variance) against scikit-learn's. Goal ≤ 1e-6.
* Peak RSS of the fit at 8× the tokens: each fit runs in a fresh process (``--child-fit``) that samples
  its RSS during the fit. The issue asks for 1M vs 8M tokens × 384; on 2 shared cores that takes far
  longer than a few minutes, so the default is scaled to 262,144 vs 2,097,152 tokens (quick: 65,536 vs
  524,288), the 8× ratio kept. ratio = peak(8×) ÷ peak(1×), goal ≤ 1.2 (memory independent of N).
* Transform vs bare matmul: ``Projection.transform`` vs ``batch @ components[:90].T`` on the same in-memory
  batches. Goal within 1.1×.
* Read + transform overlap: stream + transform vs max(stream alone, bare matmul) (goal ≥ 0.9), and vs the
  CPU bound of the cores (both sides are CPU work on a warm store, so they can overlap no further than
  (stream CPU s + one-thread matmul CPU s) / cores). Stream, matmul, transform and both interleaved, best of 5.
* Transform throughput: streaming the 1× store (``TokenStore.iter_batches``, 64 samples per batch) and
  projecting every batch with the fitted PCA to 90 dims (``Projection.transform``), tokens/s ÷ streaming
  the store alone. Best of 3 after a warm-up. Goal ≥ 0.8.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mb, row, run_python_child, script_main, temp_root, timed

GRID = (16, 16)
DIM = 384
SHARD = 64
RANK = 32
TRANSFORM_DIM = 90


def make_store(path: Path, n_tokens: int, seed: int = 0) -> Any:
    """A token store of ``n_tokens`` (a multiple of 256) seeded tokens; returns it opened read-only."""
    from stages.store import create_token_store, open_token_store, shard_ranges, write_shard

    hw = GRID[0] * GRID[1]
    n = n_tokens // hw
    group = create_token_store(path, n=n, grid=GRID, dim=DIM, label_hw=(4, 4), shard_size=SHARD,
                               with_rgb=False, with_flip=False)
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((RANK, DIM)).astype(np.float32) * np.linspace(2.0, 0.2, RANK, dtype=np.float32)[:, None]
    noise = np.geomspace(1.0, 0.05, DIM).astype(np.float32)
    offset = rng.uniform(-1, 1, DIM).astype(np.float32)
    for shard, (a, b) in enumerate(shard_ranges(n, SHARD)):
        k = (b - a) * hw
        x = rng.standard_normal((k, RANK), dtype=np.float32) @ mix
        x += rng.standard_normal((k, DIM), dtype=np.float32) * noise + offset
        write_shard(group, shard, tokens=x.reshape(b - a, *GRID, DIM), labels=np.zeros((b - a, 4, 4), np.int16),
                    ids=[str(i) for i in range(a, b)])
    return open_token_store(path)


def fit_pca(store: Any, backend: str = "auto") -> Any:
    """The reduce stage's PCA fit on every token of ``store`` (CPU)."""
    from stages.projections.fitdata import fit_moments, select_fit_rows
    from stages.projections.pca import PCAProjection

    fit = select_fit_rows(store.n, GRID[0] * GRID[1], {"subset": "all"})
    moments, _ = fit_moments(store, fit, backend, "cpu", 0)
    return PCAProjection.from_moments(moments, standardize="fit")


def child_fit(store_path: str) -> None:
    """``--child-fit STORE``: fit in this fresh process and print its RSS (MiB) as JSON.

    ``ru_maxrss`` is dominated by the import of ``stages`` (torch, timm, ...), so the fit's peak is sampled
    (psutil, every 5 ms) from just before the fit to its end; ``peak_rss_mb`` is the process RSS at that
    peak, ``rss_before_fit_mb`` the RSS just before it.
    """
    import threading

    import psutil

    from stages.store import open_token_store

    store = open_token_store(store_path)
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    pca = fit_pca(store)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss_mb": max(peak[0], before) / 2**20, "rss_before_fit_mb": before / 2**20,
                      "ru_maxrss_mb": peak_rss_mb(), "wall_s": wall, "n_tokens": pca.n_samples}))


def _sklearn_fit(x: np.ndarray) -> Any:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    return PCA(svd_solver="full").fit(StandardScaler().fit_transform(x))


def run(quick: bool = False) -> list[dict[str, Any]]:
    n_fit, n_small = (32_768, 65_536) if quick else (131_072, 262_144)
    rows = []
    with temp_root("stegopipe-bench-pca-") as tmp:
        # 1. fit speed and equality vs scikit-learn (in memory)
        store = make_store(tmp / "fit.zarr", n_fit)
        x = store.get("tokens", np.arange(store.n)).reshape(-1, DIM).astype(np.float64)
        fit_pca(store)  # warm-up (dask, BLAS)
        ours_s = timed(lambda: fit_pca(store), repeat=2, warmup=0)
        start = time.perf_counter()
        ref = _sklearn_fit(x)  # once: it is the slow side
        base_s = time.perf_counter() - start
        pca = fit_pca(store)
        rows.append(row(f"PCA fit, {n_fit:,} tokens × {DIM}", n_fit / ours_s, "tok/s", baseline=n_fit / base_s,
                        goal=">= 3", note="ours: streaming exact moments from the float16 store on disk "
                        "(Dask threads) + eigh; baseline: sklearn StandardScaler + PCA(svd_solver='full') on "
                        "the tokens in memory; ratio = ours ÷ sklearn tokens/s"))
        x_fit = x  # float64 in memory: the XᵀX floor of the same tokens
        floor_s = timed(lambda: x_fit.T @ x_fit, repeat=2, warmup=1)
        rows.append(row(f"PCA fit vs the float64 XᵀX floor, {n_fit:,} tokens × {DIM}", ours_s, "s", baseline=floor_s,
                        higher_is_better=False, goal=">= 0.667",
                        note="ours: the fit above (float16 store on disk → moments → eigh); floor: numpy float64 "
                             "x.T @ x of the same tokens already upcast in memory (best of 2); ratio = floor/ours "
                             "(>= 0.667: within 1.5x)"))
        keep = ref.explained_variance_ratio_ >= 1e-6
        rel = np.abs(pca.explained_variance_ratio[keep] / ref.explained_variance_ratio_[keep] - 1).max()
        rows.append(row("PCA EVR max rel. diff vs sklearn", float(rel), "", goal="ours <= 1e-6",
                        note=f"over the {int(keep.sum())} components holding >= 1e-6 of the variance"))
        del x, store

        # 2. peak RSS independent of N (fresh process per fit)
        peaks = {}
        for scale in (1, 8):
            path = tmp / f"rss{scale}.zarr"
            make_store(path, n_small * scale, seed=scale)
            peaks[scale] = run_python_child([str(Path(__file__).resolve()), "--child-fit", str(path)],
                                            timeout_s=1800)
            if scale == 8:
                shutil.rmtree(path)
        small, large = peaks[1], peaks[8]
        rows.append(row(f"PCA fit peak RSS, {8 * n_small:,} vs {n_small:,} tokens × {DIM}", large["peak_rss_mb"],
                        "MiB", baseline=small["peak_rss_mb"], goal="<= 1.2",
                        note=f"ratio = peak(8×) ÷ peak(1×), sampled during the fit, each in a fresh process; "
                        f"scaled to 1/4 of the issue's 1M vs 8M to keep the run to minutes on 2 shared cores; "
                        f"RSS before the fit {small['rss_before_fit_mb']:.0f} / {large['rss_before_fit_mb']:.0f} MiB; "
                        f"fit wall {small['wall_s']:.1f} s / "
                        f"{large['wall_s']:.1f} s ({large['n_tokens'] / large['wall_s']:,.0f} tok/s at 8×)"))

        # 3. transform throughput vs reading the store alone
        from stages.store import open_token_store

        store = open_token_store(tmp / "rss1.zarr")
        projection = fit_pca(store).with_dim(TRANSFORM_DIM)

        def read_only() -> None:
            for _ in store.iter_batches(SHARD):  # reads, decodes and casts to float32
                pass

        def read_transform() -> None:
            for batch in store.iter_batches(SHARD):
                projection.transform(batch["tokens"].reshape(-1, DIM))

        n_tok = store.n * GRID[0] * GRID[1]
        batches = [b["tokens"].reshape(-1, DIM) for b in store.iter_batches(SHARD)]
        matrix = np.ascontiguousarray(projection.components[:TRANSFORM_DIM].T, dtype=np.float32)
        # stream, bare matmul, transform and stream + transform interleaved, best of 5 each (with the CPU
        # seconds, all threads, of each best run): a side measured minutes apart drifts by ±10 % here
        from threadpoolctl import threadpool_limits

        def bare_one_thread() -> None:  # the matmul's CPU work without a BLAS thread pool's spinning
            with threadpool_limits(1, "blas"):
                [np.matmul(b, matrix) for b in batches]

        steps = {"read": read_only, "bare": lambda: [np.matmul(b, matrix) for b in batches],
                 "transform": lambda: [projection.transform(b) for b in batches], "both": read_transform,
                 "bare1": bare_one_thread}
        best = {name: (float("inf"), 0.0) for name in steps}
        for name, fn in steps.items():
            fn()  # warm-up
        for _ in range(5):
            for name, fn in steps.items():
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                best[name] = min(best[name], (time.perf_counter() - start, time.process_time() - cpu))
        del batches
        (read_s, read_cpu), (bare_s, _), (transform_s, _) = best["read"], best["bare"], best["both"]
        in_memory_s = best["transform"][0]
        bare_cpu = best["bare1"][1]
        rows.append(row(f"PCA transform vs bare matmul to {TRANSFORM_DIM} dims, {n_tok:,} tokens", in_memory_s, "s",
                        baseline=bare_s, higher_is_better=False, goal=">= 0.909",
                        note="Projection.transform vs numpy float32 batch @ components[:90].T on the same in-memory "
                             "float32 batches of 64 samples (interleaved, best of 5); ratio = bare/ours (>= 0.909: within 1.1x); "
                             "ours adds the fitted mean (a bias) and checks the output is finite"))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        rows.append(row(f"PCA read + transform overlap, {n_tok:,} tokens", transform_s, "s",
                        baseline=max(read_s, bare_s), higher_is_better=False, goal=">= 0.9",
                        note=f"stream + transform vs max(stream alone {read_s:.2f} s, bare matmul {bare_s:.2f} s): "
                             "1 = the transform hides entirely behind the reads or vice versa, "
                             "(read + matmul)/max = no overlap at all; ratio = max/ours; interleaved best of 5; "
                             f"load avg {load}"))
        bound_s = max(read_s, bare_s, (read_cpu + bare_cpu) / cores)
        rows.append(row(f"PCA read + transform vs the {cores}-core CPU bound, {n_tok:,} tokens", transform_s, "s",
                        baseline=bound_s, higher_is_better=False, goal=">= 0.9",
                        note=f"both sides are CPU work (a warm stream: copy, checksum, cast): the overlapped pipeline "
                             f"can finish no sooner than their CPU seconds spread over the cores, "
                             f"(read {read_cpu:.2f} + matmul on one BLAS thread {bare_cpu:.2f} CPU s) / {cores} = "
                             f"{(read_cpu + bare_cpu) / cores:.2f} s, nor sooner than either alone; "
                             f"bound = the largest of the three; ratio = bound/ours"))
        rows.append(row(f"PCA transform to {TRANSFORM_DIM} dims, {n_tok:,} tokens", n_tok / transform_s, "tok/s",
                        baseline=n_tok / read_s, goal=">= 0.8",
                        note="stream the float16 store (iter_batches, 64 samples, next shard prefetched) and "
                        "project each batch vs the same stream alone; ratio = ours ÷ read-only tokens/s"))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child-fit":
        child_fit(sys.argv[2])
    else:
        script_main(run)
