"""Exact full PCA from streamed moments (a ``Projection`` kind, ``pca``)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError, InputError
from stages.projections.base import register_projection
from stages.projections.fitdata import FitData
from stages.projections.methods import Method, register_method
from stages.projections.linear import STANDARDIZE_MODES, PCAMoments, Standardize, _check_choice, _LinearProjection


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Make the largest-|·| entry of every component row positive (sklearn ``svd_flip(u_based_decision=False)``)."""
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


@register_projection("pca")
class PCAProjection(_LinearProjection):
    """Exact full PCA from streamed moments; keeps every component so one fit serves every ``dim``.

    ``transform``: ``"fit"``: ``((x − mean)/scale) @ components[:dim].T``; ``"none"``:
    ``(x − mean) @ components[:dim].T``; ``"batch"``: ``zscore_batch(x) @ components[:dim].T``.
    Attributes (float64 numpy): ``mean [D]``, ``scale [D]`` (ones for ``"none"``), ``components [K, D]``
    sorted by descending variance, ``explained_variance [K]`` (n−1 denominator, as sklearn),
    ``explained_variance_ratio [K]``; ``n_samples``; K = min(n_samples, D).
    """

    def __init__(
        self,
        *,
        mean: np.ndarray,
        scale: np.ndarray,
        components: np.ndarray,
        explained_variance: np.ndarray,
        n_samples: int,
        standardize: Standardize = "fit",
        dim: int | None = None,
    ) -> None:
        if components.ndim != 2 or explained_variance.shape != (components.shape[0],):
            raise InputError(
                f"PCA components {components.shape} and explained_variance {explained_variance.shape} do not match"
            )
        self._init_linear(components.shape[1], standardize, mean, scale)
        self.components = components
        self.explained_variance = explained_variance
        self.n_samples = int(n_samples)
        self._dim = self.n_components if dim is None else self._checked_dim(dim)

    @classmethod
    def from_moments(cls, moments: PCAMoments, standardize: Standardize = "fit", dim: int | None = None) -> "PCAProjection":
        """Eigendecomposition of the covariance (correlation matrix unless ``standardize="none"``)."""
        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        moments._require(2)
        cov = moments.covariance()
        mean = moments.mean
        if standardize == "none":
            scale = np.ones_like(mean)
        else:
            scale = moments.scale()
            cov = cov / np.outer(scale, scale)
        evals, evecs = np.linalg.eigh(cov)
        n_keep = min(moments.count, moments.dim)
        evals = np.clip(evals[::-1][:n_keep], 0.0, None)
        components = _flip_signs(evecs[:, ::-1][:, :n_keep].T.copy())
        explained = evals * moments.count / (moments.count - 1)
        return cls(
            mean=mean,
            scale=scale,
            components=components,
            explained_variance=explained,
            n_samples=moments.count,
            standardize=standardize,
            dim=dim,
        )

    @classmethod
    def fit(cls, tokens: Any, standardize: Standardize = "fit", dim: int | None = None) -> "PCAProjection":
        """PCA of an in-memory ``[..., D]`` array (for streams use ``PCAMoments`` and ``from_moments``)."""
        return cls.from_moments(PCAMoments.of(tokens), standardize=standardize, dim=dim)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def mean(self) -> np.ndarray:
        return self._mean

    @property
    def scale(self) -> np.ndarray:
        return self._scale

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        total = self.explained_variance.sum()
        return self.explained_variance / total if total > 0 else np.zeros_like(self.explained_variance)

    def _checked_dim(self, dim: int) -> int:
        if not 1 <= dim <= self.n_components:
            raise ConfigError(f"dim={dim} is out of range: this PCA has {self.n_components} components")
        return int(dim)

    def with_dim(self, dim: int) -> "PCAProjection":
        """The same fit projecting to ``dim`` components (shares the arrays)."""
        return PCAProjection(
            mean=self._mean,
            scale=self._scale,
            components=self.components,
            explained_variance=self.explained_variance,
            n_samples=self.n_samples,
            standardize=self.standardize,  # type: ignore[arg-type]
            dim=self._checked_dim(dim),
        )

    def cumulative_evr_curve(self, num_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(fraction of D, cumulative explained-variance ratio) for paper Figure 3.

        Native: one point per component, fraction ``k/D`` for k = 1..K. With ``num_points``: the curve
        (starting at (0, 0)) linearly interpolated at ``num_points`` evenly spaced fractions in [0, 1].
        """
        fraction = np.arange(1, self.n_components + 1) / self.in_dim
        cumulative = np.cumsum(self.explained_variance_ratio)
        if num_points is None:
            return fraction, cumulative
        if num_points < 2:
            raise ConfigError(f"num_points must be >= 2, got {num_points}")
        grid = np.linspace(0.0, 1.0, num_points)
        return grid, np.interp(grid, np.r_[0.0, fraction], np.r_[0.0, cumulative])

    def _matrix(self) -> np.ndarray:
        return self.components[: self._dim].T

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {"standardize": self.standardize, "dim": self._dim, "n_samples": self.n_samples}
        arrays = {
            "mean": self._mean,
            "scale": self._scale,
            "components": self.components,
            "explained_variance": self.explained_variance,
        }
        return params, arrays

    @classmethod
    def _from_state(cls, in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> "PCAProjection":
        return cls(
            mean=arrays["mean"],
            scale=arrays["scale"],
            components=arrays["components"],
            explained_variance=arrays["explained_variance"],
            n_samples=params["n_samples"],
            standardize=params["standardize"],
            dim=params["dim"],
        )



def _fit(data: FitData, cfg: Any) -> tuple[PCAProjection, dict[str, Any]]:
    """All components, from exact moments of the fit rows."""
    moments, record = data.moments()
    return PCAProjection.from_moments(moments, standardize=cfg.reduce.standardize), record


register_method(Method("pca", "PCA", "tab:blue", stage="reduce", module=__name__, fit=_fit, seeded=False, all_dims=True,
                       dim_required=False, legend=1, contexts=((), ("reduce.materialize=true", "projection.dim=4"))))
