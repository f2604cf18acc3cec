"""Which projection a probe or evaluation uses: the ``projection`` config section.

``projection.method`` picks the provider: ``identity`` (the DINO baseline, no artifact), ``pca``,
``rp``, ``hnne`` (a ``reduce`` artifact) or ``stego`` (a ``train-head`` artifact). ``projection.dim``
is the output width (None: the method's default — all components for PCA, ``head.dim`` for STEGO).
``projection.seed`` is the one seed of a run: it seeds RP/h-NNE fits, head training and probe
initialisation, so an experiment sweeps seeds with a single axis.

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
from pipeline.planner import Request
from stages.artifacts import PROJECTION_DIR
from stages.projections import BaseProjection, IdentityProjection, load_projection

METHODS = ("identity", "pca", "rp", "hnne", "stego")
PROVIDER_STAGE = {"pca": "reduce", "rp": "reduce", "hnne": "reduce", "stego": "train-head"}


@dataclass
class ProjectionConfig:
    """The projection probes and evaluation see (``projection.*``)."""

    method: str = setting("identity", choices=METHODS)
    dim: int | None = setting(None, min=1)  # output width; None = the method's default
    seed: int = 0  # seeds RP/h-NNE fits, head training and probe initialisation


register_section("projection", ProjectionConfig)


def check_method(cfg: Any) -> str:
    """``projection.method``, after checking the section's choices and ranges."""
    check_section("projection", cfg.projection)
    return str(cfg.projection.method)


def projection_request(cfg: Any) -> dict[str, Request]:
    """``{"projection": Request}`` for the artifact providing the projection ({} for identity)."""
    method = check_method(cfg)
    return {} if method == "identity" else {"projection": Request(PROVIDER_STAGE[method], cfg)}


def projection_params(cfg: Any) -> dict[str, Any]:
    """What about the projection changes a downstream result (beyond the provider's artifact id).

    The identity has no dim of its own: ``projection.dim`` is ignored for it, so the points of a dim sweep
    share one DINO-baseline probe and evaluation."""
    method = check_method(cfg)
    return {"method": method, "dim": None if method == "identity" else cfg.projection.dim}


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
