"""``knn`` stage: cosine top-k neighbours of the pooled train tokens (STEGO's ``nns`` file).

The math is :mod:`stages.stego.knn`."""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import register_section, setting
from pipeline.context import StageContext
from pipeline.planner import Request
from pipeline.registry import register_stage
from stages.artifacts import KnnArtifact
from stages.stego.knn import STEGO_NUM_NEIGHBORS, descriptors_from_store, save_nns_npz, topk_neighbors

@dataclass
class KnnConfig:
    """kNN pairs for STEGO positives (``knn.*``)."""

    k: int = setting(STEGO_NUM_NEIGHBORS, min=1)  # neighbours per sample (column 0 is the sample itself)
    block_size: int = setting(4096, runtime=True, min=1)  # rows/columns per similarity block (memory ~ block_size²)
    batch_size: int = setting(64, runtime=True, min=1)  # samples per read when pooling descriptors
    read_workers: int = setting(4, runtime=True, min=1)  # reads in flight (a disk streams faster with several)


register_section("knn", KnnConfig)


def _knn_inputs(cfg: Any, args: Mapping[str, Any]) -> dict[str, Request]:
    return {"tokens": Request("extract", cfg, {"split": "train"})}


@register_stage("knn", kind="knn", sections=("knn",), inputs=_knn_inputs, make_target="make knn")
def knn_stage(ctx: StageContext) -> None:
    """Cosine top-k neighbours of the pooled train tokens (STEGO's nns file)."""
    from stages.store import TokensArtifact

    store = TokensArtifact(ctx.input("tokens").path).store
    start = time.perf_counter()
    descriptors = descriptors_from_store(store, batch_size=ctx.runtime.knn.batch_size,
                                         workers=ctx.runtime.knn.read_workers)
    read_s = time.perf_counter() - start
    wanted = int(ctx.config.knn.k)
    k = min(wanted, store.n)
    nns, sims = topk_neighbors(descriptors, k, block_size=ctx.runtime.knn.block_size,
                               device=ctx.device, return_similarities=True)
    search_s = time.perf_counter() - start - read_s
    save_nns_npz(ctx.out / KnnArtifact.NNS, nns, sims)
    notes = [f"knn.k={wanted} exceeds the {store.n} train samples; stored k={k}"] if k < wanted else []
    ctx.record(counts={"samples": store.n, "k": k}, notes=notes,  # phases: plan's cost model (stages/costs.py)
               phase_seconds={"read": round(read_s, 3), "search": round(search_s, 3)},
               throughput={"samples_per_s": round(store.n / max(time.perf_counter() - start, 1e-9), 1)})
