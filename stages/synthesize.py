"""``synthesize`` stage: the built-in synthetic dataset (generic folder layout) as a ``dataset`` artifact,
the input of ``prepare`` when ``dataset.name=synthetic``."""
from __future__ import annotations

from pipeline.context import StageContext
from pipeline.registry import register_stage
from stages.datasets.synthetic import generate_synthetic


@register_stage("synthesize", version="1", kind="dataset", sections=("dataset.synthetic",),
                make_target="make prepare DATASET=synthetic")
def synthesize(ctx: StageContext) -> None:
    """Generate the built-in synthetic dataset (folder layout)."""
    p = ctx.params
    generate_synthetic(ctx.out, n_train=p["n_train"], n_val=p["n_val"], size=(p["height"], p["width"]),
                       seed=p["seed"])
    ctx.record(counts={"train": p["n_train"], "val": p["n_val"]}, seeds={"synthetic": p["seed"]})
