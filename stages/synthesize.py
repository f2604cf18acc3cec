"""``synthesize`` stage: the built-in synthetic dataset (generic folder layout) as a ``dataset`` artifact,
the input of ``prepare`` when ``dataset.name=synthetic``."""
from __future__ import annotations

from pipeline.context import StageContext
from pipeline.registry import register_stage
from stages.datasets.synthetic import generate_synthetic


@register_stage("synthesize", kind="dataset", sections=("dataset.synthetic",),
                make_target="make prepare DATASET=synthetic")
def synthesize(ctx: StageContext) -> None:
    """Generate the built-in synthetic dataset (folder layout)."""
    p = ctx.config.dataset.synthetic
    generate_synthetic(ctx.out, n_train=int(p.n_train), n_val=int(p.n_val), size=(int(p.height), int(p.width)),
                       seed=int(p.seed))
    ctx.record(counts={"train": p.n_train, "val": p.n_val}, seeds={"synthetic": p.seed})
