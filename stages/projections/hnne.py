"""h-NNE fitted on a token subsample (a ``Projection`` kind, ``hnne``), transform without pickle."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import psutil

from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from stages.projections.base import BaseProjection, check_fit_rows, register_projection
from stages.projections.fitdata import FitData
from stages.projections.methods import Method, register_method
from stages.projections.linear import STANDARDIZE_MODES, Standardize, _batch_standardize, _check_choice, _safe_scale

HNNE_VERSIONS: tuple[str, ...] = ("v1", "v2")
_HNNE_EXACT_NN_MAX = 20_000  # hnne.HNNE ann_threshold default: FINCH uses dense n×n distances up to here

torch = lazy_module("torch")


def hnne_memory_estimate(n: int, d: int) -> int:
    """Peak bytes for ``HNNEProjection.fit`` on ``n`` tokens of width ``d`` (a deliberately generous estimate).

    Four float32 ``n × d`` arrays (the subsample, its z-scored copy, h-NNE's own standardised copy and its
    PCA working copy), 1 KiB per token (FINCH neighbour graphs, partitions, projections), FINCH's dense
    ``n × n`` distances (float64 + float32 copy) when ``n <= 20000`` (h-NNE's exact-1-NN threshold), and
    1 GiB for numba/pynndescent compilation and libraries.
    """
    dense = 12 * n * n if n <= _HNNE_EXACT_NN_MAX else 0
    return 16 * n * d + 1024 * n + dense + 2**30


def check_hnne_memory(n: int, d: int, available_bytes: int | None = None) -> None:
    """Raise ``ConfigError`` if fitting h-NNE on ``n × d`` tokens would not fit in available RAM (psutil)."""
    need = hnne_memory_estimate(n, d)
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > available:
        raise ConfigError(
            f"h-NNE on a subsample of {n} tokens × {d} needs about {need / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB of RAM is available; lower the number of tokens to sample "
            f"(about {max(0, (available - 2**30) // (16 * d + 1024))} fit)"
        )


def _column_mean_scale(x: np.ndarray, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population std (float64, two passes over row chunks, constant columns -> 1)."""
    n = x.shape[0]
    total = np.zeros(x.shape[1])
    for start in range(0, n, chunk_rows):
        total += x[start : start + chunk_rows].sum(axis=0, dtype=np.float64)
    mean = total / n
    sq = np.zeros(x.shape[1])
    for start in range(0, n, chunk_rows):
        sq += ((x[start : start + chunk_rows].astype(np.float64) - mean) ** 2).sum(axis=0)
    return mean, _safe_scale(sq / n, mean, n)


_HNNE_CORE = (
    "centroids",
    "inner_mean",
    "inner_scale",
    "pca_mean",
    "pca_components",
    "anchors",
    "anchor_radii",
    "points_mean",
    "points_max_radius",
)
_HNNE_INFLATION = ("inflation_rot", "inflation_mean1", "inflation_std1", "inflation_mean2", "inflation_std2")
_HNNE_MAX_NORM = 3.0  # hnne 2.0.1 HNNE.transform: MAX_NORM_ALLOWED
_NN_BLOCK = 2**24  # point-centroid distance pairs per block in the nearest-centroid search


def _hnne_arrays(model: Any) -> dict[str, np.ndarray]:
    """The arrays ``HNNE.transform`` (hnne 2.0.1) reads, taken from a fitted ``hnne.HNNE``."""
    hp, pp = model.hierarchy_parameters, model.projection_parameters
    if pp.pca is None or pp.pca.whiten:
        raise InputError("h-NNE model must use the (non-whitened) PCA preliminary embedding")
    arrays = {
        "centroids": hp.lowest_level_centroids,
        "inner_mean": pp.scaler.mean_,
        "inner_scale": pp.scaler.scale_,
        "pca_mean": pp.pca.mean_,
        "pca_components": pp.pca.components_,
        "anchors": pp.projected_centroids[-2],
        "anchor_radii": pp.projected_centroid_radii[-1],
        "points_mean": pp.points_means[-1],
        "points_max_radius": pp.points_max_radii[-1],
    }
    if model.n_components <= 3 and pp.inflation_params_list:
        steps = pp.inflation_params_list[-1]
        arrays["inflation_rot"] = np.stack([rot for rot, _, _ in steps])
        arrays["inflation_mean1"] = np.stack([n1[0] for _, n1, _ in steps])
        arrays["inflation_std1"] = np.stack([n1[1] for _, n1, _ in steps])
        arrays["inflation_mean2"] = np.stack([n2[0] for _, _, n2 in steps])
        arrays["inflation_std2"] = np.stack([n2[1] for _, _, n2 in steps])
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


@register_projection("hnne")
class HNNEProjection(BaseProjection):
    """h-NNE (hnne 2.0.1) fitted on a token subsample; transform without the ``hnne`` object or pickle.

    ``HNNE.transform`` places a new point by its nearest finest-level centroid (original space): the
    point's PCA projection, centred and scaled relative to that cluster, goes around the cluster's
    projected anchor. This class stores exactly the O(#clusters) arrays that step reads (``_HNNE_CORE``,
    plus the inflation steps for dim <= 3) in safetensors and applies the same formulas. Differences from
    ``HNNE.transform``, both deliberate: the nearest centroid is always exact (hnne switches to approximate
    NNDescent above 4e8 point-centroid pairs, which would make codes depend on the batch size), and the
    arithmetic is float64. The ``hnne`` object itself holds O(n) fit data and persists only by pickle.
    """

    def __init__(
        self,
        *,
        arrays: dict[str, np.ndarray],
        standardize: Standardize,
        metric: str,
        version: str,
        seed: int,
        n_fit: int,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ) -> None:
        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        _check_choice("version", version, HNNE_VERSIONS)
        missing = [k for k in _HNNE_CORE if k not in arrays]
        if missing:
            raise InputError(f"h-NNE arrays lack {missing}")
        k, in_dim = arrays["centroids"].shape
        dim = arrays["pca_components"].shape[0]
        expected = {
            "inner_mean": (in_dim,),
            "inner_scale": (in_dim,),
            "pca_mean": (in_dim,),
            "pca_components": (dim, in_dim),
            "anchors": (k, dim),
            "anchor_radii": (k,),
            "points_mean": (k, dim),
            "points_max_radius": (k,),
        }
        wrong = {name: arrays[name].shape for name, shape in expected.items() if arrays[name].shape != shape}
        if wrong:
            raise InputError(f"h-NNE arrays have inconsistent shapes {wrong} for {k} centroids, {in_dim} -> {dim}")
        if (standardize != "none") != (mean is not None and scale is not None):
            raise ConfigError("h-NNE standardize='fit'/'batch' needs the fit mean and scale; 'none' takes none")
        self.in_dim = int(in_dim)
        self.arrays = arrays
        self.standardize = standardize
        self.metric = metric
        self.version = version
        self.seed = int(seed)
        self.n_fit = int(n_fit)
        self.mean = mean
        self.scale = scale

    @classmethod
    def fit(
        cls,
        tokens: np.ndarray | torch.Tensor,
        dim: int,
        seed: int,
        version: str = "v1",
        metric: str = "cosine",
        standardize: Standardize = "fit",
        available_bytes: int | None = None,
    ) -> "HNNEProjection":
        """Fit ``hnne.HNNE(n_components=dim, metric, hnne_version=version, random_state=seed)`` on tokens [n, D].

        ``version="v1"`` is the legacy layout stego-studies used (hnne <= 1.x). Unless ``standardize="none"``
        the tokens are z-scored first (§10.5). Refuses (``ConfigError``) when the fit would not fit in RAM.
        """
        from hnne import HNNE

        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        _check_choice("version", version, HNNE_VERSIONS)
        x = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        n, d = check_fit_rows(x, dim, "h-NNE")
        check_hnne_memory(n, d, available_bytes)
        mean = scale = None
        if standardize == "none":
            z = x.astype(np.float32, copy=False)
        else:
            mean, scale = _column_mean_scale(x)
            z = np.empty((n, d), np.float32)
            for start in range(0, n, 65536):
                z[start : start + 65536] = (x[start : start + 65536].astype(np.float64) - mean) / scale
        model = HNNE(
            n_components=dim,
            metric=metric,
            hnne_version=version,
            random_state=seed,
            ann_threshold=_HNNE_EXACT_NN_MAX,
        )
        try:
            model.fit(z)
        except ValueError as err:
            raise InputError(f"h-NNE could not fit {n} tokens of width {d}: {err}") from err
        return cls(
            arrays=_hnne_arrays(model),
            standardize=standardize,
            metric=metric,
            version=version,
            seed=seed,
            n_fit=n,
            mean=mean,
            scale=scale,
        )

    @property
    def dim(self) -> int:
        return int(self.arrays["pca_components"].shape[0])

    @property
    def n_clusters(self) -> int:
        """Number of finest-level clusters (anchors)."""
        return int(self.arrays["centroids"].shape[0])

    def _nearest_centroids(self, z: np.ndarray) -> np.ndarray:
        from sklearn.metrics import pairwise_distances

        centroids = self.arrays["centroids"]
        block = max(1, _NN_BLOCK // len(centroids))
        return np.concatenate(
            [
                np.argmin(pairwise_distances(z[s : s + block], centroids, metric=self.metric), axis=1)
                for s in range(0, len(z), block)
            ]
        )

    def apply_hnne(self, z: np.ndarray) -> np.ndarray:
        """The h-NNE transform of already standardised float64 tokens ``z [N, D]`` -> float64 ``[N, dim]``."""
        a = self.arrays
        nearest = self._nearest_centroids(z)
        y = (z - a["inner_mean"]) / a["inner_scale"]
        y = (y - a["pca_mean"]) @ a["pca_components"].T
        if "inflation_rot" in a:
            steps = zip(*(a[name] for name in _HNNE_INFLATION))
            for rot, mean1, std1, mean2, std2 in steps:
                y = (y - mean1[nearest]) / std1[nearest]
                y = y @ rot
                y = (y - mean2[nearest]) / std2[nearest]
                y = y @ np.linalg.inv(rot)
            norms = np.linalg.norm(y, axis=-1, keepdims=True)
            too_far = norms > _HNNE_MAX_NORM
            y = np.where(too_far, _HNNE_MAX_NORM * y / np.where(too_far, norms, 1.0), y)
        normalized = (y - a["points_mean"][nearest]) / a["points_max_radius"][nearest][:, None]
        return a["anchors"][nearest] + normalized * a["anchor_radii"][nearest][:, None]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize == "batch":
            x = _batch_standardize(x)
        elif self.mean is not None and self.scale is not None:  # "fit"
            mean = torch.from_numpy(self.mean).to(x.device, x.dtype)
            x = (x - mean) / torch.from_numpy(self.scale).to(x.device, x.dtype)
        z = x.detach().cpu().numpy().astype(np.float64, copy=False)
        return torch.from_numpy(self.apply_hnne(z)).to(x.device)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {
            "standardize": self.standardize,
            "metric": self.metric,
            "version": self.version,
            "seed": self.seed,
            "n_fit": self.n_fit,
        }
        arrays = dict(self.arrays)
        if self.mean is not None and self.scale is not None:
            arrays |= {"mean": self.mean, "scale": self.scale}
        return params, arrays

    @classmethod
    def _from_state(cls, in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> "HNNEProjection":
        mean, scale = arrays.pop("mean", None), arrays.pop("scale", None)
        return cls(
            arrays=arrays,
            standardize=params["standardize"],
            metric=params["metric"],
            version=params["version"],
            seed=params["seed"],
            n_fit=params["n_fit"],
            mean=mean,
            scale=scale,
        )


def _fit(data: FitData, cfg: Any) -> tuple[HNNEProjection, dict[str, Any]]:
    """``reduce.hnne_tokens`` fit rows drawn with ``projection.seed``, checked against the free RAM before
    they are read, then :meth:`HNNEProjection.fit`."""
    r = cfg.reduce
    sub = data.sample(int(r.hnne_tokens), int(cfg.projection.seed))
    check_hnne_memory(sub.n_rows, data.store.dim)  # before reading anything
    start = time.perf_counter()
    projection = HNNEProjection.fit(data.read(sub), dim=int(cfg.projection.dim), seed=int(cfg.projection.seed),
                                    version=r.hnne_version, metric=r.hnne_metric, standardize=r.standardize)
    return projection, {"hnne": {"n_tokens": sub.n_rows, "n_samples": len(sub.samples),
                                 "n_clusters": projection.n_clusters},
                        "timing": {"hnne_fit_s": round(time.perf_counter() - start, 3)}}


register_method(Method(
    "hnne", "h-NNE", "tab:purple", stage="reduce", module=__name__, fit=_fit, fields=("reduce.hnne_*",),
    materialize=True, legend=3,
    contexts=(("projection.dim=2", "reduce.materialize=false"), ("projection.dim=2", "reduce.materialize=true"))))
