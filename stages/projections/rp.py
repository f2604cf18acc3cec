"""Seeded random projection with orthonormal columns (a ``Projection`` kind, ``rp``)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.params import Exclude
from stages.projections.base import register_projection
from stages.projections.fitdata import FitData
from stages.projections.methods import Method, register_method
from stages.projections.linear import STANDARDIZE_MODES, PCAMoments, Standardize, _check_choice, _LinearProjection


@register_projection("rp")
class RandomProjection(_LinearProjection):
    """Seeded Gaussian projection with orthonormal columns: ``standardize(x) @ matrix`` (``matrix [D, d]``).

    ``matrix`` = Q of the QR decomposition of a ``default_rng(seed)`` standard-normal ``[D, d]`` draw, with
    column signs fixed so that R has a positive diagonal (deterministic, Haar-distributed).
    """

    def __init__(
        self,
        *,
        matrix: np.ndarray,
        seed: int,
        standardize: Standardize = "none",
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ) -> None:
        if matrix.ndim != 2:
            raise InputError(f"random projection matrix must be 2-D [D, d], got shape {matrix.shape}")
        if (standardize == "fit") != (mean is not None and scale is not None):
            raise ConfigError("standardize='fit' needs mean and scale, and only it takes them")
        self._init_linear(matrix.shape[0], standardize, mean, scale)
        self.matrix = matrix
        self.seed = int(seed)

    @classmethod
    def fit(
        cls,
        in_dim: int,
        dim: int,
        seed: int,
        standardize: Standardize = "none",
        moments: PCAMoments | None = None,
    ) -> "RandomProjection":
        """Draw the matrix; ``standardize="fit"`` takes mean/population std from ``moments`` (required then)."""
        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        if not 1 <= dim <= in_dim:
            raise ConfigError(f"dim={dim} is out of range: random projection needs 1 <= dim <= in_dim={in_dim}")
        if (standardize == "fit") != (moments is not None):
            raise ConfigError("standardize='fit' needs the fit moments, and only it takes them")
        if moments is not None and moments.dim != in_dim:
            raise InputError(f"moments have width {moments.dim}, in_dim is {in_dim}")
        gauss = np.random.default_rng(seed).standard_normal((in_dim, dim))
        q, r = np.linalg.qr(gauss)
        signs = np.sign(np.diag(r))
        signs[signs == 0] = 1.0
        return cls(
            matrix=q * signs[None, :],
            seed=seed,
            standardize=standardize,
            mean=None if moments is None else moments.mean,
            scale=None if moments is None else moments.scale(),
        )

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def _matrix(self) -> np.ndarray:
        return self.matrix

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"matrix": self.matrix}
        if self._mean is not None and self._scale is not None:
            arrays |= {"mean": self._mean, "scale": self._scale}
        return {"standardize": self.standardize, "seed": self.seed}, arrays

    @classmethod
    def _from_state(cls, in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> "RandomProjection":
        return cls(
            matrix=arrays["matrix"],
            seed=params["seed"],
            standardize=params["standardize"],
            mean=arrays.get("mean"),
            scale=arrays.get("scale"),
        )



def _fit(data: FitData, cfg: Any) -> tuple[RandomProjection, dict[str, Any]]:
    """The seeded matrix; with ``reduce.standardize=fit`` its mean and scale from exact moments."""
    moments, record = data.moments() if cfg.reduce.standardize == "fit" else (None, {})
    return RandomProjection.fit(data.store.dim, int(cfg.projection.dim), int(cfg.projection.seed),
                                standardize=cfg.reduce.standardize, moments=moments), record


register_method(Method(
    "rp", "RP", "tab:green", stage="reduce", module=__name__, fit=_fit, legend=2,
    exclude=(Exclude(("reduce.fit_subset", "reduce.fit_n", "reduce.subset_seed"),
                     "without fitted moments (reduce.standardize other than fit) it reads no tokens",
                     when=lambda cfg, args: cfg.reduce.standardize != "fit"),),
    contexts=(("projection.dim=4",), ("projection.dim=4", "reduce.standardize=none"))))
