"""UMAP next to h-NNE on the demo's tokens: fit + transform wall time and peak RSS.

Data: the demo's train and val tokens (``make demo``'s synthetic preset: 48 train images at 64 px, 16 val at
96 px, random-init ViT-S/8: 3,072 train and 2,304 val tokens (+ the flipped ones) × 384), extracted once into
a temp root. Each method runs in a fresh process (``--child METHOD STORE STORE``) that fits on every train
token (h-NNE: the reduce stage's defaults, cosine, v1 layout; UMAP: umap-learn with ``random_state``, 15
neighbours, ``standardize=fit`` for both) and transforms every train and val token, as the reduce stage does
when it materialises codes; the child reports its wall time and its peak RSS above the RSS before the fit.
A fresh process pays each library's numba compilation once, as a reduce stage does: included in the time.
Rows (report only): UMAP's time and RSS with h-NNE's as the baseline (ratio = h-NNE ÷ UMAP), and, where cuML
is installed (the ``gpu`` extra, on a GPU), cuML's UMAP next to umap-learn's, and cuML's PCA and nearest
neighbours next to ours on the GPU (issue 20.4: use cuML where it beats our own): PCA of 1M × 384 float16
tokens (ours: moments on the GPU through cupy/torch, then the eigendecomposition; cuML:
``cuml.decomposition.PCA`` on the same tokens already on the device, float32) and cosine top-30 of
100k × 384 descriptors (ours: :func:`stages.stego.knn.topk_neighbors` on cuda; cuML:
``cuml.neighbors.NearestNeighbors(metric="cosine")``). Untested until a GPU is lent (none was while this
was written).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, run_python_child, script_main, temp_root

DIM = 16
METHODS = {"hnne": "h-NNE", "umap": "UMAP (umap-learn)", "umap-cuml": "UMAP (cuML)"}


def demo_stores(root: Path) -> tuple[str, str]:
    """Extract the demo's train and val tokens into ``root``; their store paths."""
    import stages.plugin  # noqa: F401  (the synthetic preset, the stages)
    from pipeline.config import load_config
    from pipeline.planner import Request, plan
    from pipeline.runner import run_tasks
    from stages.store import TokensArtifact

    cfg = load_config("synthetic", [f"run.root={root}", "run.executor=local"])
    requests = [Request("extract", cfg, {"split": split}) for split in ("train", "val")]
    tasks, targets = plan(requests)
    paths = {r.id: r.path for r in run_tasks(tasks, cfg.run)}
    return tuple(str(TokensArtifact(paths[t]).store_path) for t in targets)  # type: ignore[return-value]


def child(method: str, train_path: str, val_path: str) -> None:
    """``--child METHOD TRAIN VAL``: fit on every train token, transform every train and val token (and the
    flipped val tokens), print wall seconds and peak RSS above the start (MiB) as JSON."""
    import numpy as np
    import psutil

    import stages.plugin  # noqa: F401
    from stages.store import open_token_store

    train, val = open_token_store(train_path), open_token_store(val_path)
    x = train.get("tokens", np.arange(train.n)).reshape(-1, train.dim).astype(np.float32)
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    running = True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if method == "hnne":
        from stages.projections.hnne import HNNEProjection

        projection: Any = HNNEProjection.fit(x, dim=DIM, seed=0, version="v1", metric="cosine", standardize="fit")
    else:
        from stages.projections.umap import UMAPProjection

        projection = UMAPProjection.fit(x, DIM, 0, standardize="fit",
                                        backend="cuml" if method == "umap-cuml" else "umap-learn")
    fit_s = time.perf_counter() - start
    n = 0
    for store, arrays in ((train, ("tokens",)), (val, ("tokens", "tokens_flip") if val.has_flip else ("tokens",))):
        for array in arrays:
            tokens = store.get(array, np.arange(store.n)).reshape(-1, store.dim).astype(np.float32)
            projection.transform(tokens)
            n += len(tokens)
    wall = time.perf_counter() - start
    running = False
    sampler.join()
    print(json.dumps({"fit_s": fit_s, "wall_s": wall, "tokens": n, "fit_tokens": len(x),
                      "peak_mb": (peak[0] - base) / 2**20}))


def run(quick: bool = False) -> list[dict[str, Any]]:
    methods = ["hnne", "umap"] + (["umap-cuml"] if importlib.util.find_spec("cuml") else [])
    with temp_root() as root:
        train, val = demo_stores(root)
        got = {m: run_python_child([__file__, "--child", m, train, val], timeout_s=900) for m in methods}
    hnne, umap = got["hnne"], got["umap"]
    note = (f"demo tokens: fit on {umap['fit_tokens']:,} train, transform {umap['tokens']:,} train+val(+flip) "
            f"tokens to {DIM} dims; fresh process each (numba compilation included); fit alone: UMAP "
            f"{umap['fit_s']:.1f} s, h-NNE {hnne['fit_s']:.1f} s; ratio = h-NNE ÷ UMAP")
    rows = [row("UMAP fit+transform (demo tokens)", umap["wall_s"], "s", baseline=hnne["wall_s"],
                higher_is_better=False, note=note),
            row("UMAP fit+transform peak RSS (demo tokens)", umap["peak_mb"], "MiB", baseline=hnne["peak_mb"],
                higher_is_better=False, note="above the process RSS before the fit; baseline h-NNE")]
    if "umap-cuml" in got:
        rows += cuml_rows(quick)
        cuml = got["umap-cuml"]
        rows.append(row("UMAP cuML fit+transform (demo tokens)", cuml["wall_s"], "s", baseline=umap["wall_s"],
                        higher_is_better=False, note="baseline umap-learn on the CPU (seeded, one thread)"))
    return rows


def cuml_rows(quick: bool) -> list[dict[str, Any]]:
    """cuML's PCA and nearest neighbours next to ours, on the GPU (see the module docstring)."""
    import cupy
    import numpy as np
    import torch
    from cuml.decomposition import PCA as CumlPCA
    from cuml.neighbors import NearestNeighbors

    from benchmarks.common import timed
    from stages.projections.linear import accumulate_moments
    from stages.projections.pca import PCAProjection
    from stages.stego.knn import topk_neighbors

    rng = np.random.default_rng(0)
    n_pca, n_knn = (2**18, 2**14) if quick else (2**20, 100_000)
    tokens = rng.standard_normal((n_pca, 384), dtype=np.float32).astype(np.float16)
    chunks = [tokens[i : i + 65536] for i in range(0, n_pca, 65536)]
    ours = timed(lambda: PCAProjection.from_moments(accumulate_moments(chunks, "auto")), repeat=2)
    on_device = cupy.asarray(tokens, dtype=cupy.float32)
    theirs = timed(lambda: (CumlPCA(n_components=384).fit(on_device), cupy.cuda.Device().synchronize()), repeat=2)
    descriptors = rng.standard_normal((n_knn, 384), dtype=np.float32)
    ours_knn = timed(lambda: topk_neighbors(descriptors, 30, device="cuda"), repeat=2)
    gpu_descriptors = cupy.asarray(descriptors)
    theirs_knn = timed(lambda: NearestNeighbors(n_neighbors=30, metric="cosine").fit(gpu_descriptors)
                       .kneighbors(gpu_descriptors), repeat=2)
    torch.cuda.synchronize()
    return [row(f"PCA fit {n_pca:,} x 384 on the GPU", ours, "s", baseline=theirs, higher_is_better=False,
                note="ours: moments (cupy/torch) + eigh from host float16 chunks; baseline cuML PCA on device float32"),
            row(f"cosine top-30 of {n_knn:,} x 384 on the GPU", ours_knn, "s", baseline=theirs_knn,
                higher_is_better=False, note="ours: blocked top-k (torch); baseline cuML NearestNeighbors")]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        script_main(run)
