"""Reducers: exact streaming PCA, seeded random projection and h-NNE, as ``Projection`` kinds.

Pure math (no file I/O besides each projection's own ``save``/``load``). Spec: stego-reference §10.3–10.5.

Standardisation (``standardize``), shared by all three kinds:

- ``"fit"``: z-score with the per-channel mean and population std of the fit data (sklearn
  ``StandardScaler``), fixed at fit time.
- ``"batch"``: z-score every ``transform`` call with that batch's own mean and population std (what
  stego-studies does at projection time, §10.3, so codes depend on batch composition). PCA and h-NNE are
  still fitted on z-scored data; PCA subtracts no ``mean_`` afterwards.
- ``"none"``: no z-score (PCA still centres with the fitted mean; RP and h-NNE use raw tokens).

Near-constant channels get scale 1, as in ``StandardScaler``.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np
import psutil
import torch

from pipeline.errors import ConfigError, InputError
from stages.projection import BaseProjection, check_tokens, register_projection

Standardize = Literal["fit", "none", "batch"]
STANDARDIZE_MODES: tuple[str, ...] = ("fit", "none", "batch")
MOMENT_BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch", "cupy", "cuml")
HNNE_VERSIONS: tuple[str, ...] = ("v1", "v2")

_EPS64 = float(np.finfo(np.float64).eps)
_HNNE_EXACT_NN_MAX = 20_000  # hnne.HNNE ann_threshold default: FINCH uses dense n×n distances up to here


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _safe_scale(var: np.ndarray, mean: np.ndarray, count: int) -> np.ndarray:
    """Population std with near-constant channels set to 1 (StandardScaler's rule, plus moment cancellation)."""
    var = np.maximum(var, 0.0)
    bound = count * _EPS64 * var + (count * mean * _EPS64) ** 2 + 10 * _EPS64 * mean**2
    return np.where(var <= bound, 1.0, np.sqrt(var))


def _batch_standardize(x: torch.Tensor) -> torch.Tensor:
    """Z-score ``x [N, D]`` with its own per-channel mean and population std (constant channels: scale 1)."""
    mean = x.mean(dim=0)
    var = x.var(dim=0, correction=0)
    eps = torch.finfo(x.dtype).eps
    n = x.shape[0]
    bound = n * eps * var + (n * mean * eps) ** 2 + 10 * eps * mean**2
    std = torch.where(var <= bound, torch.ones_like(var), var.sqrt())
    return (x - mean) / std


def _rows(chunk: Any, name: str = "chunk") -> np.ndarray:
    """View a float ``[..., D]`` array (or CPU tensor) as ``[n, D]`` rows, without changing its dtype."""
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu().numpy()
    arr = np.asarray(chunk)
    if arr.ndim < 2:
        raise InputError(f"{name} must be at least 2-D [..., D], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name} must be floating point, got {arr.dtype}")
    return arr.reshape(-1, arr.shape[-1])


# --------------------------------------------------------------------------------------------------
# Streaming moments
# --------------------------------------------------------------------------------------------------


@dataclass
class PCAMoments:
    """Exact first and second moments of a token stream: ``count``, ``sum [D]``, ``xtx = XᵀX [D, D]``.

    All float64; memory O(D²) whatever the number of tokens. ``update`` adds a chunk in place,
    ``merge`` returns the moments of the union of two streams.
    """

    count: int
    sum: np.ndarray
    xtx: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "PCAMoments":
        """Moments of zero tokens of width ``dim``."""
        if dim < 1:
            raise ConfigError(f"token width must be >= 1, got {dim}")
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, tokens: Any) -> "PCAMoments":
        """Moments of one in-memory array ``[..., D]``."""
        rows = _rows(tokens, "tokens")
        return cls.empty(rows.shape[1]).update(rows)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, chunk: Any) -> "PCAMoments":
        """Add a chunk ``[..., D]`` of any float dtype (upcast to float64 per chunk); returns ``self``."""
        rows = _rows(chunk)
        if rows.shape[1] != self.dim:
            raise InputError(f"chunk has width {rows.shape[1]}, moments have width {self.dim}")
        x = rows.astype(np.float64)
        if not np.isfinite(x).all():
            raise InputError("chunk contains NaN or inf values")
        self.count += int(x.shape[0])
        self.sum += x.sum(axis=0)
        self.xtx += x.T @ x
        return self

    def merge(self, other: "PCAMoments") -> "PCAMoments":
        """Moments of both streams together (a new object)."""
        if other.dim != self.dim:
            raise InputError(f"cannot merge moments of width {self.dim} and {other.dim}")
        return PCAMoments(self.count + other.count, self.sum + other.sum, self.xtx + other.xtx)

    @property
    def mean(self) -> np.ndarray:
        self._require(1)
        return self.sum / self.count

    def covariance(self) -> np.ndarray:
        """Population covariance ``XᵀX/n − μμᵀ`` (symmetrised)."""
        self._require(1)
        mean = self.mean
        cov = self.xtx / self.count - np.outer(mean, mean)
        return (cov + cov.T) / 2

    def scale(self) -> np.ndarray:
        """Per-channel population std, near-constant channels set to 1 (``StandardScaler.scale_``)."""
        return _safe_scale(np.diag(self.covariance()).copy(), self.mean, self.count)

    def _require(self, n: int) -> None:
        if self.count < n:
            raise InputError(f"moments hold {self.count} tokens; at least {n} needed")


def _merge_all(*parts: PCAMoments) -> PCAMoments:
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part)
    return out


def pca_moments_dask(x: Any, split_every: int = 8) -> PCAMoments:
    """Moments of a dask array ``[..., D]`` (leading axes flattened): one task per block, tree-reduced.

    Runs on whatever dask scheduler is active (threads by default, a distributed client if one is set).
    Equal to ``PCAMoments.of(x.compute())`` up to float64 summation order.
    """
    import dask

    if x.ndim < 2:
        raise InputError(f"dask array must be at least 2-D [..., D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"dask array must be floating point, got {x.dtype}")
    if split_every < 2:
        raise ConfigError(f"split_every must be >= 2, got {split_every}")
    if len(x.chunks[-1]) != 1:
        x = x.rechunk({x.ndim - 1: -1})
    parts = [dask.delayed(PCAMoments.of)(block) for block in x.to_delayed().ravel()]
    while len(parts) > 1:
        parts = [dask.delayed(_merge_all)(*parts[i : i + split_every]) for i in range(0, len(parts), split_every)]
    (moments,) = dask.compute(parts[0])
    return moments


_DeviceOps = tuple[Callable[[np.ndarray], Any], Callable[[Any], bool], Callable[[Any], np.ndarray]]


def _device_ops(backend: str) -> _DeviceOps | None:
    """(to-device float64, all-finite, to-host) for a device backend; ``None`` means plain numpy."""
    _check_choice("backend", backend, MOMENT_BACKENDS)
    if backend in ("auto", "cupy", "cuml"):
        try:
            import cupy

            has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception as err:  # cupy missing, or present without a usable CUDA runtime
            if backend != "auto":
                raise ConfigError(f"backend={backend!r} needs cupy with a GPU: {err}") from err
            has_gpu = False
        if has_gpu:
            return (
                lambda rows: cupy.asarray(rows).astype(cupy.float64),
                lambda x: bool(cupy.isfinite(x).all()),
                cupy.asnumpy,
            )
        if backend != "auto":
            raise ConfigError(f"backend={backend!r} needs a GPU, and cupy sees none")
    if backend == "torch" or (backend == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return (
            lambda rows: torch.from_numpy(np.ascontiguousarray(rows)).to(device).to(torch.float64),
            lambda x: bool(torch.isfinite(x).all()),
            lambda x: x.cpu().numpy(),
        )
    return None


def accumulate_moments(chunks: Iterable[Any], backend: str = "auto") -> PCAMoments:
    """Moments of a stream of ``[..., D]`` chunks, accumulated on ``backend``.

    ``"numpy"``: ``PCAMoments.update`` on the CPU. ``"cupy"`` (alias ``"cuml"``) / ``"torch"``: float64
    accumulators on the GPU (torch falls back to its CPU device without one), chunks sent in their own
    dtype and upcast there. ``"auto"``: cupy if it sees a GPU, else torch if CUDA is available, else numpy.
    """
    ops = _device_ops(backend)
    if ops is None:
        moments: PCAMoments | None = None
        for chunk in chunks:
            rows = _rows(chunk)
            moments = (PCAMoments.empty(rows.shape[1]) if moments is None else moments).update(rows)
        if moments is None:
            raise InputError("no chunks to accumulate moments from")
        return moments
    to_device, all_finite, to_host = ops
    count, total, xtx = 0, None, None
    for chunk in chunks:
        rows = _rows(chunk)
        if total is not None and rows.shape[1] != total.shape[0]:
            raise InputError(f"chunk has width {rows.shape[1]}, earlier chunks have width {total.shape[0]}")
        x = to_device(rows)
        if not all_finite(x):
            raise InputError("chunk contains NaN or inf values")
        count += int(x.shape[0])
        total = x.sum(0) if total is None else total + x.sum(0)
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
    if total is None:
        raise InputError("no chunks to accumulate moments from")
    return PCAMoments(count, to_host(total).astype(np.float64), to_host(xtx).astype(np.float64))


# --------------------------------------------------------------------------------------------------
# Linear projections
# --------------------------------------------------------------------------------------------------


class _LinearProjection(BaseProjection):
    """``standardize(x) @ matrix[:, :dim]``; caches the device copies of its arrays."""

    standardize: str

    def _init_linear(self, in_dim: int, standardize: str, mean: np.ndarray | None, scale: np.ndarray | None) -> None:
        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        for key, arr in (("mean", mean), ("scale", scale)):
            if arr is not None and arr.shape != (in_dim,):
                raise InputError(f"{self.kind} {key} has shape {arr.shape}, expected ({in_dim},)")
        self.in_dim = int(in_dim)
        self.standardize = standardize
        self._mean = mean
        self._scale = scale
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor | None, torch.Tensor]] = {}

    @abstractmethod
    def _matrix(self) -> np.ndarray:
        """The ``[in_dim, dim]`` matrix applied after standardisation."""

    def _tensors(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(bias, matrix) on ``x``'s device/dtype, with the fitted standardisation folded in (in float64):
        ``((x - mean) / scale) @ M == x @ (M / scale[:, None]) - (mean / scale) @ M`` — one pass over x."""
        key = (x.device, x.dtype)
        if key not in self._cache:
            matrix = np.asarray(self._matrix(), dtype=np.float64)
            bias = None
            if self.standardize != "batch":
                scale = np.ones(self.in_dim) if self._scale is None else np.asarray(self._scale, np.float64)
                matrix = matrix / scale[:, None]
                if self._mean is not None:
                    bias = -(np.asarray(self._mean, np.float64) @ matrix)

            def conv(a: np.ndarray | None) -> torch.Tensor | None:
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(x.device, x.dtype)

            self._cache[key] = (conv(bias), conv(matrix))
        return self._cache[key]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        bias, matrix = self._tensors(x)
        if self.standardize == "batch":
            return _batch_standardize(x) @ matrix
        return x @ matrix if bias is None else torch.addmm(bias, x, matrix)


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


# --------------------------------------------------------------------------------------------------
# h-NNE
# --------------------------------------------------------------------------------------------------


def sample_token_rows(n_total: int, n_wanted: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of ``min(n_wanted, n_total)`` distinct rows of ``[0, n_total)`` (``default_rng(seed)``)."""
    if n_total < 1:
        raise InputError(f"cannot subsample from {n_total} tokens")
    if n_wanted < 1:
        raise ConfigError(f"number of tokens to sample must be >= 1, got {n_wanted}")
    if n_wanted >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rows = np.random.default_rng(seed).choice(n_total, size=n_wanted, replace=False)
    return np.sort(rows).astype(np.int64)


def hnne_memory_estimate(n: int, d: int) -> int:
    """Peak bytes for ``HNNEProjection.fit`` on ``n`` tokens of width ``d`` (a deliberately generous estimate).

    Four float32 ``n × d`` arrays (the subsample, its z-scored copy, h-NNE's own standardised copy and its
    PCA working copy), 1 KiB per token (FINCH neighbour graphs, partitions, projections), FINCH's dense
    ``n × n`` distances (float64 + float32 copy) when ``n <= 20000`` (h-NNE's exact-1-NN threshold), and
    1 GiB for numba/pynndescent compilation and libraries. Measured peaks (d=256): 1.1 GiB at n=10k,
    0.85 GiB at n=60k.
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
        if x.ndim != 2:
            raise InputError(f"tokens must be 2-D [n, D], got shape {x.shape}")
        n, d = x.shape
        check_tokens(x, d)
        if not 1 <= dim <= d:
            raise ConfigError(f"dim={dim} is out of range: h-NNE needs 1 <= dim <= {d}")
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
