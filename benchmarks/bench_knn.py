"""kNN of global descriptors (``stages.stego.knn.topk_neighbors``) vs scikit-learn brute force.

``N`` × 384 seeded Gaussian descriptors (N = 100k; quick: 10k), k = 30 (STEGO's ``nns`` width). Each
side runs in its own fresh process, so its peak RSS (``ru_maxrss``, interpreter and imports included)
is its own; time covers the neighbour search only (fit + kneighbors for scikit-learn). Ours always
searches all N rows; at 100k scikit-learn answers the first 10k query rows against the full 100k index
and its time is scaled by N/10k (brute-force kneighbors is linear in the query count), which keeps the
full run within minutes on 2 cores. The parent checks that both found the same neighbour sets on the
rows both answered. Goals: peak RSS ≤ 2 GB, time ≥ 1× scikit-learn.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mb, row, run_python_child, script_main, temp_root

DIM = 384
K = 30


def _descriptors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def child(side: str, n: int, queries: int, out: Path) -> dict[str, Any]:
    """Run one side's search on fresh descriptors, save its ``[rows,K]`` indices to ``out``, return stats.

    ``ours`` searches all ``n`` rows; ``sklearn`` the first ``queries`` rows against all ``n``.
    """
    x = _descriptors(n)
    if side == "ours":
        from stages.stego.knn import topk_neighbors

        start = time.perf_counter()
        nns = topk_neighbors(x, K)
    else:
        from sklearn.neighbors import NearestNeighbors

        start = time.perf_counter()
        nns = NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine").fit(x).kneighbors(
            x[:queries], return_distance=False)
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(nns, dtype=np.int64))
    return {"side": side, "n": n, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose neighbour sets are equal (order ignored)."""
    return float(np.mean(np.all(np.sort(a, axis=1) == np.sort(b, axis=1), axis=1)))


def run(quick: bool = False) -> list[dict[str, Any]]:
    n, queries = (10_000, 10_000) if quick else (100_000, 10_000)
    me = str(Path(__file__).resolve())
    with temp_root("stegopipe-bench-knn-") as tmp:
        stats = {side: run_python_child([me, "--child", side, "--n", str(n), "--queries", str(queries),
                                         "--out", str(tmp / f"{side}.npy")], timeout_s=1200)
                 for side in ("ours", "sklearn")}
        agree = _agreement(np.load(tmp / "ours.npy")[:queries], np.load(tmp / "sklearn.npy"))
    ours, base = stats["ours"], stats["sklearn"]
    base_seconds = base["seconds"] * n / queries
    scaled = "" if queries == n else f"; sklearn timed on {queries // 1000}k query rows, scaled ×{n / queries:g}"
    label = f"{n // 1000}k × {DIM}, k={K}"
    return [
        row(f"kNN peak RSS ({label})", ours["peak_rss_mb"], "MB", baseline=base["peak_rss_mb"],
            higher_is_better=False, goal="ours <= 2048",
            note="whole process (python + torch + descriptors) in a fresh subprocess; baseline: scikit-learn "
                 "brute force in its own process; ratio = baseline/ours"),
        row(f"kNN time ({label})", ours["seconds"], "s", baseline=base_seconds, higher_is_better=False,
            goal=">= 1",
            note=f"stages.stego.knn.topk_neighbors vs NearestNeighbors(algorithm='brute', metric='cosine').kneighbors; "
                 f"ratio = sklearn/ours (speed-up){scaled}; identical neighbour sets in {100 * agree:.2f}% of "
                 f"the rows both answered"),
    ]


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("ours", "sklearn"))
    parser.add_argument("--n", type=int)
    parser.add_argument("--queries", type=int)
    parser.add_argument("--out", type=Path)
    opts, rest = parser.parse_known_args()
    if opts.child:
        print(json.dumps(child(opts.child, opts.n, opts.queries, opts.out)))
    else:
        script_main(run, rest)


if __name__ == "__main__":
    _main()
