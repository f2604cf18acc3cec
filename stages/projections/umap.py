"""UMAP, beyond the paper: a ``Projection`` kind and the ``umap`` method, fitted on a token subsample.

**Fit** (method ``umap``, stage ``reduce``): ``umap.tokens`` rows drawn from the fit data with
``projection.seed`` (the h-NNE rule, :meth:`~stages.projections.fitdata.FitData.sample`), checked against
the free RAM before they are read, z-scored as ``reduce.standardize`` says, then embedded in
``projection.dim`` dimensions by

- ``umap-learn`` on the CPU: ``UMAP(n_components, n_neighbors, min_dist, metric, n_epochs,
  random_state=projection.seed)``. Deterministic for a fixed seed; the price is speed: with a
  ``random_state`` umap-learn runs its optimisation on one thread (docs/method.md §10.8, bench_reducers);
- cuML's ``cuml.manifold.UMAP`` on the GPU (the ``gpu`` extra): same parameters, its own random state.
  Its embedding is not umap-learn's, so the backend is part of the id: ``umap.backend=auto`` resolves when
  the run is planned (cuml when cuML is installed, else umap-learn) and the params record the result;
  asking for ``cuml`` without cuML (or on a CPU run) is one error line.

**Transform** (ours, the same whichever backend fitted): a token's code is the membership-weighted mean of
the embeddings of its ``n_neighbors`` nearest fitted rows, umap-learn's own placement of new points
(``smooth_knn_dist`` with local connectivity 0, then ``init_graph_transform``), with exact neighbours and
two deliberate differences: no SGD epochs afterwards (umap-learn optimises a whole batch of new points
together, so a code would depend on the batch it came in), and each token's kernel width is bounded by
its own mean neighbour distance rather than the batch's. A code is therefore a function of the token alone,
independent of batches and shards, on the CPU and the GPU (torch). It is as expensive as a nearest-
neighbour search against the fitted rows, so the reduce stage materialises the codes by default
(``reduce.materialize``). Saved without pickle: the standardised fitted rows, their embedding, the
standardisation, and the parameters.
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from pipeline.config import setting
from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from pipeline.params import Derive
from stages.projections.base import BaseProjection, check_fit_rows, register_projection
from stages.projections.fitdata import FitData
from stages.projections.linear import STANDARDIZE_MODES, _batch_standardize, _check_choice, _safe_scale
from stages.projections.methods import Method, register_method

torch = lazy_module("torch")

UMAP_METRICS = ("euclidean", "cosine")
UMAP_BACKENDS = ("auto", "umap-learn", "cuml")
_BLOCK = 2**24  # query × fitted-row distances per block of the transform's neighbour search
_SIGMA_ITERATIONS = 64  # umap-learn's smooth_knn_dist: binary search steps and tolerance
_SIGMA_TOLERANCE = 1e-5
_MIN_SIGMA_SCALE = 1e-3


@dataclass
class UMAPConfig:
    """UMAP (``umap.*``, read only by ``projection.method=umap``)."""

    tokens: int = setting(20_000, min=2)  # token rows subsampled from the fit data (projection.seed)
    n_neighbors: int = setting(15, min=2)
    min_dist: float = setting(0.1, min=0.0)
    metric: str = setting("euclidean", choices=UMAP_METRICS)
    epochs: int | None = setting(None, min=1)  # optimisation epochs; None: umap-learn's default (200 or 500)
    backend: str = setting("auto", choices=UMAP_BACKENDS)  # auto: cuml when installed, else umap-learn


def umap_backend(requested: str) -> str:
    """The backend ``umap.backend`` names (``auto`` resolved); one error line when cuML is asked for and
    missing."""
    has_cuml = importlib.util.find_spec("cuml") is not None
    if requested == "cuml" and not has_cuml:
        raise ConfigError("umap.backend=cuml needs cuML on an NVIDIA GPU: pip install 'stegopipe[gpu]' "
                          "(cuml-cu13, cupy-cuda13x), or set umap.backend=umap-learn")
    return ("cuml" if has_cuml else "umap-learn") if requested == "auto" else requested


def umap_memory_estimate(n: int, d: int, n_neighbors: int) -> int:
    """Peak bytes of :meth:`UMAPProjection.fit` on ``n`` tokens of width ``d`` (generous): four float32
    ``n × d`` copies, the fuzzy kNN graph (``n × n_neighbors`` indices, distances and both symmetrised
    sparse copies) and 1 GiB for numba/pynndescent compilation and libraries."""
    return 16 * n * d + 64 * n * n_neighbors + 2**30


def check_umap_memory(n: int, d: int, n_neighbors: int, available_bytes: int | None = None) -> None:
    """``ConfigError`` when fitting UMAP on ``n × d`` tokens would not fit in the available RAM."""
    need = umap_memory_estimate(n, d, n_neighbors)
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > available:
        raise ConfigError(f"UMAP on {n} tokens × {d} needs about {need / 2**30:.1f} GiB but only "
                          f"{available / 2**30:.1f} GiB of RAM is available; lower umap.tokens (about "
                          f"{max(0, (available - 2**30) // (16 * d + 64 * n_neighbors))} fit)")


def _embed(z: np.ndarray, dim: int, seed: int, n_neighbors: int, min_dist: float, metric: str,
           epochs: int | None, backend: str) -> np.ndarray:
    if backend == "cuml":
        try:
            from cuml.manifold import UMAP as CumlUMAP
        except ImportError as err:
            raise ConfigError(f"umap.backend=cuml: cuML does not import ({err}); pip install 'stegopipe[gpu]'") from err
        model = CumlUMAP(n_components=dim, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                         n_epochs=epochs, random_state=seed)
        return np.asarray(model.fit_transform(z), dtype=np.float32)
    import warnings

    import umap

    model = umap.UMAP(n_components=dim, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                      n_epochs=epochs, random_state=seed)
    with warnings.catch_warnings():  # "n_jobs overridden to 1 by setting random_state": the documented price
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return np.asarray(model.fit_transform(z), dtype=np.float32)


@register_projection("umap")
class UMAPProjection(BaseProjection):
    """UMAP fitted on a token subsample; the transform places a token by its nearest fitted rows (module
    docstring). ``data``: the standardised fitted rows ``[n, D]``; ``embedding``: their codes ``[n, d]``."""

    def __init__(self, data: np.ndarray, embedding: np.ndarray, *, standardize: str, metric: str,
                 n_neighbors: int, seed: int, backend: str, mean: np.ndarray | None = None,
                 scale: np.ndarray | None = None) -> None:
        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        _check_choice("metric", metric, UMAP_METRICS)
        if data.ndim != 2 or embedding.ndim != 2 or len(data) != len(embedding):
            raise InputError(f"UMAP arrays do not match: data {data.shape}, embedding {embedding.shape}")
        if not 2 <= n_neighbors <= len(data):
            raise InputError(f"UMAP n_neighbors={n_neighbors} needs 2..{len(data)} fitted rows")
        if (standardize == "fit") != (mean is not None and scale is not None):
            raise ConfigError("UMAP standardize='fit' needs the fit mean and scale; other modes take none")
        self.in_dim = int(data.shape[1])
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.embedding = np.ascontiguousarray(embedding, dtype=np.float32)
        self.standardize, self.metric, self.backend = standardize, metric, backend
        self.n_neighbors, self.seed = int(n_neighbors), int(seed)
        self.mean, self.scale = mean, scale

    @classmethod
    def fit(cls, tokens: np.ndarray, dim: int, seed: int, *, n_neighbors: int = 15, min_dist: float = 0.1,
            metric: str = "euclidean", epochs: int | None = None, standardize: str = "fit",
            backend: str = "umap-learn") -> UMAPProjection:
        """Embed ``tokens [n, D]`` with ``backend`` (``umap-learn`` or ``cuml``); see the module docstring."""
        _check_choice("standardize", standardize, STANDARDIZE_MODES)
        x = np.asarray(tokens, dtype=np.float32)
        n, d = check_fit_rows(x, dim, "UMAP")
        if n <= n_neighbors:
            raise InputError(f"UMAP needs more than n_neighbors={n_neighbors} tokens, got {n}")
        mean = scale = None
        if standardize == "fit":
            mean = x.mean(axis=0, dtype=np.float64)
            scale = _safe_scale(x.var(axis=0, dtype=np.float64), mean, n)
            x = ((x - mean) / scale).astype(np.float32)
        elif standardize == "batch":
            x = _batch_standardize(torch.from_numpy(x)).numpy()
        embedding = _embed(x, dim, seed, n_neighbors, min_dist, metric, epochs, backend)
        return cls(x, embedding, standardize=standardize, metric=metric, n_neighbors=n_neighbors, seed=seed,
                   backend=backend, mean=mean, scale=scale)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.standardize == "batch":
            x = _batch_standardize(x)
        elif self.mean is not None and self.scale is not None:
            x = (x - torch.from_numpy(self.mean).to(x)) / torch.from_numpy(self.scale).to(x)
        data = torch.from_numpy(self.data).to(x.device)
        if self.metric == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
            data = torch.nn.functional.normalize(data, dim=1)
        embedding = torch.from_numpy(self.embedding).to(x.device, torch.float64)
        codes = []
        step = max(1, _BLOCK // len(data))  # bounds the block's distances to _BLOCK floats
        for a in range(0, len(x), step):
            q = x[a : a + step]
            dist = (1.0 - q @ data.T).clamp_min(0.0) if self.metric == "cosine" else torch.cdist(q, data)
            nearest = torch.topk(dist, self.n_neighbors, dim=1, largest=False, sorted=True)
            d = nearest.values.to(torch.float64)
            sigma = _kernel_widths(d, self.n_neighbors)
            weights = torch.where(d > 0, torch.exp(-d / sigma[:, None]), torch.ones_like(d))
            weights = weights / weights.sum(dim=1, keepdim=True)
            codes.append((weights[:, :, None] * embedding[nearest.indices]).sum(dim=1))
        return torch.cat(codes).to(torch.float32)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {"standardize": self.standardize, "metric": self.metric, "n_neighbors": self.n_neighbors,
                  "seed": self.seed, "backend": self.backend}
        arrays = {"data": self.data, "embedding": self.embedding}
        if self.mean is not None and self.scale is not None:
            arrays |= {"mean": self.mean, "scale": self.scale}
        return params, arrays

    @classmethod
    def _from_state(cls, in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> UMAPProjection:
        if arrays["data"].shape[1] != in_dim:
            raise InputError(f"saved UMAP rows have width {arrays['data'].shape[1]}, in_dim is {in_dim}")
        return cls(arrays["data"], arrays["embedding"], standardize=params["standardize"], metric=params["metric"],
                   n_neighbors=int(params["n_neighbors"]), seed=int(params["seed"]), backend=params["backend"],
                   mean=arrays.get("mean"), scale=arrays.get("scale"))


def _kernel_widths(d: torch.Tensor, k: int) -> torch.Tensor:
    """umap-learn's ``smooth_knn_dist`` for new points (local connectivity 0, so rho = 0), vectorised: per
    row the width sigma whose kernel ``sum_{j>=1} exp(-d_j / sigma)`` equals ``log2(k)``, bounded below by
    1e-3 of the row's mean distance."""
    target = math.log2(k)
    lo = torch.zeros(len(d), dtype=d.dtype, device=d.device)
    hi = torch.full_like(lo, math.inf)
    mid = torch.ones_like(lo)
    done = torch.zeros(len(d), dtype=torch.bool, device=d.device)
    rest = d[:, 1:]
    for _ in range(_SIGMA_ITERATIONS):
        psum = torch.where(rest > 0, torch.exp(-rest / mid[:, None]), torch.ones_like(rest)).sum(dim=1)
        done |= (psum - target).abs() < _SIGMA_TOLERANCE
        above = (psum > target) & ~done
        below = ~above & ~done
        hi = torch.where(above, mid, hi)
        lo = torch.where(below, mid, lo)
        mid = torch.where(above, (lo + hi) / 2, torch.where(below & torch.isinf(hi), mid * 2,
                                                             torch.where(below, (lo + hi) / 2, mid)))
        if bool(done.all()):
            break
    return torch.maximum(mid, _MIN_SIGMA_SCALE * d.mean(dim=1))


def _fit(data: FitData, cfg: Any) -> tuple[UMAPProjection, dict[str, Any]]:
    """``umap.tokens`` fit rows drawn with ``projection.seed``, the RAM check, then the embedding."""
    u, seed = cfg.umap, int(cfg.projection.seed)
    backend = str(data.params["umap.backend"])
    if backend == "cuml" and data.device != "cuda":
        raise ConfigError(f"umap.backend=cuml runs on the GPU, but this stage runs on {data.device}; set "
                          "run.device=cuda, or umap.backend=umap-learn")
    sub = data.sample(int(u.tokens), seed)
    check_umap_memory(sub.n_rows, data.store.dim, int(u.n_neighbors))  # before reading anything
    start = time.perf_counter()
    projection = UMAPProjection.fit(data.read(sub), int(cfg.projection.dim), seed, n_neighbors=int(u.n_neighbors),
                                    min_dist=float(u.min_dist), metric=str(u.metric),
                                    epochs=None if u.epochs is None else int(u.epochs),
                                    standardize=str(cfg.reduce.standardize), backend=backend)
    return projection, {"umap": {"n_tokens": sub.n_rows, "n_samples": len(sub.samples), "backend": backend},
                        "timing": {"umap_fit_s": round(time.perf_counter() - start, 3)}}


register_method(Method(
    "umap", "UMAP", "tab:orange", stage="reduce", module=__name__, fit=_fit, section=("umap", UMAPConfig),
    derive=(Derive("umap.backend", lambda cfg, args: umap_backend(cfg.umap.backend), replaces=("umap.backend",)),),
    materialize=True, paper=False, legend=4,
    contexts=(("projection.dim=2", "umap.backend=umap-learn", "reduce.materialize=false"),
              ("projection.dim=2", "umap.backend=umap-learn", "reduce.materialize=true"))))
