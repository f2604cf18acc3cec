"""``train-head`` stage: a STEGO head (+ probes) trained on the token cache, or a released checkpoint
imported (the training loop: :mod:`stages.stego.train`).

``head.checkpoint=<file.ckpt>`` makes the stage import a released STEGO checkpoint instead
(:func:`stages.projections.stego.write_imported`); its params are then only the file's sha256, so the
artifact is the one ``stegopipe import-stego <file.ckpt>`` creates. It also declares the ``stego``
projection method (its projection module imports torch, so the declaration lives with the stage that
provides it).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import json_safe, write_json_atomic
from pipeline.config import register_section, section_fields, setting
from pipeline.errors import InputError
from pipeline.params import Context, Derive, Exclude, Params
from pipeline.context import StageContext
from pipeline.planner import Request
from pipeline.registry import register_stage
from stages.projections.methods import Method, register_method
from stages.stego.settings import PROJECTIONS, SELECTIONS, TrainSettings

STAGE = "train-head"


@dataclass
class LossWeights:
    """λ of the three partner kinds (method.md §3.4); defaults: STEGO's train_config.yml."""

    intra: float = 0.67  # λ_self
    inter: float = 0.25  # λ_knn
    neg: float = 0.63  # λ_rand


@dataclass
class LossShifts:
    """b of the three partner kinds (method.md §3.2); defaults: STEGO's train_config.yml."""

    intra: float = 0.18  # b_self
    inter: float = 0.12  # b_knn
    neg: float = 0.46  # b_rand


@dataclass
class HeadConfig:
    """The STEGO head and its training (``head.*``). Defaults are STEGO's ``train_config.yml`` (which
    matches no paper model, method.md §12.1); the dataset presets set the paper's Table 1 values."""

    projection: str = setting("nonlinear", choices=PROJECTIONS)
    dim: int = 70  # code width (projection.dim overrides it when projection.method=stego)
    dropout: float = 0.1  # Dropout2d probability on the features
    lr: float = 5e-4  # head Adam learning rate (probes: 5e-3)
    steps: int = setting(5000, min=1)  # one step = one batch
    batch_size: int = 16
    feature_samples: int = 11  # S: S×S sample points per image
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False
    weights: LossWeights = field(default_factory=LossWeights)
    shifts: LossShifts = field(default_factory=LossShifts)
    num_neighbors: int = 7  # kNN partner uniform over nns columns 1..num_neighbors
    true_permutation: bool = False  # negatives from a true derangement instead of STEGO's super_perm
    val_every: int = 100  # validate every N steps (0: never; then selection must be last)
    selection: str = setting("last", choices=SELECTIONS)
    extra_clusters: int = 0
    amp: bool = True  # autocast on CUDA
    checkpoint: str | None = None  # import this STEGO .ckpt instead of training
    checkpoint_ignore_unknown: bool = setting(False, runtime=True)  # import despite unknown state-dict keys
    val_batch_size: int = setting(8, runtime=True, min=1)  # samples per validation forward
    loader_workers: int = setting(4, runtime=True, min=0)  # batches read (and decompressed) ahead in threads


register_section("head", HeadConfig)


def _imported(cfg: Any, args: Any) -> bool:
    return bool(cfg.head.checkpoint)


def _stego_dim(cfg: Any) -> bool:
    """``projection.dim`` sets the head's width (method stego with a dim)."""
    return cfg.projection.method == "stego" and cfg.projection.dim is not None


def _checkpoint_sha256(cfg: Any, args: Any) -> str:
    from stages.stego.checkpoint import checkpoint_sha256

    return checkpoint_sha256(Path(cfg.head.checkpoint))


TRAINED_FIELDS = tuple(f"head.{key}" for key, _, meta in section_fields(HeadConfig)
                       if not meta.get("runtime") and key != "checkpoint")
HEAD_PARAMS = Params(
    exclude=(
        Exclude((*TRAINED_FIELDS, "projection.*"), "an imported checkpoint is its own content: its sha256 "
                "(imported) is the id", when=_imported),
        Exclude(("projection.method",), "only projection.method=stego with a projection.dim changes the head "
                "(its width, dim)", when=lambda cfg, args: not _stego_dim(cfg)),
        Exclude(("projection.dim",), "head.dim gives the width unless projection.method=stego",
                when=lambda cfg, args: cfg.projection.method != "stego"),
        Exclude(("head.dim",), "projection.dim gives the width", when=lambda cfg, args: _stego_dim(cfg)),
    ),
    derive=(
        Derive("imported", _checkpoint_sha256, replaces=("head.checkpoint",), when=_imported),
        Derive("dim", lambda cfg, args: int(cfg.projection.dim if _stego_dim(cfg) else cfg.head.dim),
               replaces=("head.dim", "projection.dim", "projection.method"),
               when=lambda cfg, args: not _imported(cfg, args)),
    ),
    contexts=(Context(), Context(("projection.method=stego", "projection.dim=50")),
              Context(("head.checkpoint={checkpoint}",))))

register_method(Method("stego", "STEGO", "tab:red", stage=STAGE, module="stages.projections.stego", dim_required=False,
                       legend=5, contexts=((), ("projection.dim=50",))))


def train_settings(ctx: StageContext) -> TrainSettings:
    """The :class:`TrainSettings` of a trained head: the ``head.*`` fields, the width (``dim``, derived)
    and ``projection.seed``."""
    cfg = ctx.config
    head = {k: v for k, v in dict(cfg.head).items() if k in TrainSettings.__dataclass_fields__}
    head["weights"] = {k: float(v) for k, v in dict(cfg.head.weights).items()}
    head["shifts"] = {k: float(v) for k, v in dict(cfg.head.shifts).items()}
    return TrainSettings(**{**head, "dim": int(ctx.params["dim"])}, seed=int(cfg.projection.seed))


def head_inputs(cfg: Any, args: Mapping[str, Any]) -> dict[str, Request]:
    """tokens (extract train), knn, and the val tokens when validating; none for an import."""
    if cfg.head.checkpoint:
        return {}
    inputs = {"tokens": Request("extract", cfg, {"split": "train"}), "knn": Request("knn", cfg)}
    if cfg.head.val_every > 0:
        inputs["val"] = Request("extract", cfg, {"split": "val"})
    return inputs


@register_stage(STAGE, kind="head", sections=("head", "projection"), params=HEAD_PARAMS, inputs=head_inputs,
                make_target="make train-head", resources={"GPU": 1})
def run_train_head(ctx: StageContext) -> None:
    """Train a STEGO head (+ probes) on cached tokens, or import a released checkpoint."""
    runtime = ctx.runtime.head
    if "imported" in ctx.params:
        from stages.projections.stego import write_imported

        ctx.record(**write_imported(Path(ctx.config.head.checkpoint), ctx.out, expected_sha256=ctx.params["imported"],
                                    ignore_unknown=bool(runtime.checkpoint_ignore_unknown)))
        return
    from stages.artifacts import KnnArtifact
    from stages.projections.stego import write_head_files
    from stages.stego.knn import load_nns_npz
    from stages.stego.train import plot_diagnostics, train_head
    from stages.store import TokensArtifact

    settings = train_settings(ctx)
    train = TokensArtifact(ctx.input("tokens").path).store
    n_classes = train.attrs.get("n_classes")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise InputError(f"token store {train.path}: attribute n_classes is {n_classes!r}, expected an integer >= 1")
    nns = load_nns_npz(KnnArtifact(ctx.input("knn").path).nns_path, expected_n=train.n)
    val = TokensArtifact(ctx.input("val").path).store if "val" in ctx.inputs else None
    result = train_head(train, nns, settings, n_classes=n_classes, val=val, device=ctx.device,
                        val_batch_size=int(runtime.val_batch_size), loader_workers=int(runtime.loader_workers),
                        progress=True)
    info = {"source": "trained", "chosen_step": result.chosen_step, "selection": settings.selection,
            "backbone": train.attrs.get("backbone"), "dataset": train.attrs.get("dataset")}
    class_names = list(train.attrs.get("class_names") or [f"class_{i}" for i in range(n_classes)])
    write_head_files(ctx.out, result.head, result.linear, result.cluster, class_names=class_names, info=info)
    diagnostics = json_safe(result.diagnostics)
    write_json_atomic(ctx.out / "diagnostics.json", diagnostics)
    plot_diagnostics(diagnostics, ctx.out, title=f"STEGO head, {train.attrs.get('dataset')}, d={settings.dim}, "
                                                 f"seed {settings.seed}")
    chosen_val = next((v for v in diagnostics["validation"] if v["step"] == result.chosen_step), None)
    final = {k: v[-1] for k, v in diagnostics["curves"].items()}
    ctx.record(counts={"train_samples": train.n, "val_samples": val.n if val else 0, "steps": settings.steps},
               chosen_step=result.chosen_step, selection=settings.selection, val_at_chosen_step=chosen_val,
               final_losses=final, throughput=result.stats, seeds={"projection.seed": settings.seed, **result.seeds})
