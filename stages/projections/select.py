"""Which projection a probe or evaluation uses: the ``projection`` config section.

``projection.method`` names a registered :class:`~stages.projections.methods.Method`: ``identity`` (the
DINO baseline, no artifact), ``pca``, ``rp``, ``hnne``, ``umap`` (a ``reduce`` artifact), ``stego`` (a
``train-head`` artifact) or a plugin's. ``projection.dim`` is the output width (None: the method's
default — all components for PCA, ``head.dim`` for STEGO). ``projection.seed`` is the one seed of a run:
it seeds RP/h-NNE/UMAP fits, head training and probe initialisation, so an experiment sweeps seeds with
a single axis.

Every artifact that provides a projection saves it with ``Projection.save(<artifact>/projection)``;
:func:`open_projection` loads it and narrows it to the requested dim when the provider stores more
components than asked for (one PCA fit serves every dim of a sweep).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import check_section, register_section, setting
from pipeline.errors import ConfigError
from pipeline.params import Context, Exclude
from pipeline.planner import Request
from stages.artifacts import PROJECTION_DIR
from stages.projections import BaseProjection, IdentityProjection, load_projection
from stages.projections.methods import get_method, method_names, methods


@dataclass
class ProjectionConfig:
    """The projection probes and evaluation see (``projection.*``)."""

    method: str = setting("identity", choices=method_names)  # a registered method
    dim: int | None = setting(None, min=1)  # output width; None = the method's default
    seed: int = 0  # seeds RP/h-NNE/UMAP fits, head training and probe initialisation


register_section("projection", ProjectionConfig)


def check_method(cfg: Any) -> str:
    """``projection.method``, after checking the section's choices and ranges."""
    check_section("projection", cfg.projection)
    return str(cfg.projection.method)


def projection_request(cfg: Any) -> dict[str, Request]:
    """``{"projection": Request}`` for the artifact providing the projection ({} for identity)."""
    stage = get_method(check_method(cfg)).stage
    return {} if stage is None else {"projection": Request(stage, cfg)}


NO_DIM_WITHOUT_PROVIDER = Exclude(
    ("projection.dim",), "a method without an artifact (the DINO baseline) has no dim of its own: the points "
    "of a dim sweep share one baseline", when=lambda cfg, args: get_method(cfg.projection.method).stage is None)
"""For stages reading a projection (probe, evaluate)."""


def reader_contexts(*overrides: str) -> tuple[Context, ...]:
    """Contract-test contexts of a stage reading a projection: every registered method in its first
    context (as the reduce and train-head stages declare them), with ``overrides``."""
    return tuple(Context((f"projection.method={m.name}", *m.contexts[0], *overrides)) for m in methods())


def open_projection(provider: Path | None, in_dim: int, dim: int | None) -> BaseProjection:
    """The projection saved in ``provider`` (an artifact folder; None = identity on ``in_dim``),
    narrowed to ``dim`` output channels when it stores more."""
    if provider is None:
        return IdentityProjection(in_dim)
    projection = load_projection(provider / PROJECTION_DIR)
    if projection.in_dim != in_dim:
        raise ConfigError(f"projection in {provider} expects tokens of width {projection.in_dim}, "
                          f"but the tokens have width {in_dim}")
    if dim is not None and dim != projection.dim:
        narrow = getattr(projection, "with_dim", None)
        if narrow is None:
            raise ConfigError(f"projection in {provider} has dim {projection.dim}; it cannot be narrowed to {dim}")
        projection = narrow(dim)
    return projection
