"""Shared by the PCA, random-projection and h-NNE kinds: standardisation, exact streaming moments and
the linear projection base class. Pure math (docs/method.md, "Reducers").

Standardisation (``standardize``):

- ``"fit"``: z-score with the per-channel mean and population std of the fit data (sklearn
  ``StandardScaler``), fixed at fit time.
- ``"batch"``: z-score every ``transform`` call with that batch's own mean and population std (what
  stego-studies does at projection time, so codes depend on batch composition). PCA and h-NNE are
  still fitted on z-scored data; PCA subtracts no ``mean_`` afterwards.
- ``"none"``: no z-score (PCA still centres with the fitted mean; RP and h-NNE use raw tokens).

Near-constant channels get scale 1, as in ``StandardScaler``.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from stages.projections.base import BaseProjection, check_tokens

Standardize = Literal["fit", "none", "batch"]
STANDARDIZE_MODES: tuple[str, ...] = ("fit", "none", "batch")
MOMENT_BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch", "cupy")

_EPS64 = float(np.finfo(np.float64).eps)
_UPCAST_ROWS = 8192  # rows upcast to float64 at once by PCAMoments.update (24 MiB at D = 384)

torch = lazy_module("torch")


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
        """Add a chunk ``[..., D]`` of any float dtype; returns ``self``.

        Rows are upcast to float64 ``_UPCAST_ROWS`` at a time (never the whole chunk: memory stays
        O(D·_UPCAST_ROWS) for an in-memory array of any size). A non-finite value makes its step's sum
        non-finite, so the element-wise finiteness check runs only then (one pass fewer per step).
        """
        rows = _rows(chunk)
        if rows.shape[1] != self.dim:
            raise InputError(f"chunk has width {rows.shape[1]}, moments have width {self.dim}")
        total, xtx = np.zeros_like(self.sum), np.zeros_like(self.xtx)
        for start in range(0, rows.shape[0], _UPCAST_ROWS):
            x = rows[start : start + _UPCAST_ROWS].astype(np.float64)
            step_sum = x.sum(axis=0)
            if not np.isfinite(step_sum).all() and not np.isfinite(x).all():
                raise InputError("chunk contains NaN or inf values")
            total += step_sum
            xtx += x.T @ x
        self.count += int(rows.shape[0])  # only now: a chunk with a bad value leaves the moments unchanged
        self.sum += total
        self.xtx += xtx
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
    if backend in ("auto", "cupy"):
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

    ``"numpy"``: ``PCAMoments.update`` on the CPU. ``"cupy"`` / ``"torch"``: float64
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

    def transform(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """As :meth:`BaseProjection.transform`. A numpy batch (fitted standardisation) is projected by numpy's
        BLAS into a float32 (float64 for float64 input) result, and its finiteness is checked on the narrower
        output, by its sum (one pass, no mask): a NaN or inf token value makes every output of its row, and
        so the sum, non-finite; the input is checked (the same error) only when the sum is not finite."""
        if isinstance(tokens, torch.Tensor) or self.standardize == "batch":
            return super().transform(tokens)
        x = np.asarray(tokens)
        if x.ndim != 2 or x.shape[1] != self.in_dim or not np.issubdtype(x.dtype, np.floating):
            return super().transform(tokens)  # raises the one-line error of check_tokens
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        bias, matrix = (t.numpy() if t is not None else None for t in self._tensors(
            torch.empty(0, dtype=torch.float64 if dtype == np.float64 else torch.float32)))
        out = np.matmul(x.astype(dtype, copy=False), matrix)
        if bias is not None:
            out += bias
        with np.errstate(over="ignore"):  # a sum of finite codes may overflow: then the input check decides
            total = out.sum()
        if not np.isfinite(total):
            check_tokens(x, self.in_dim)  # a non-finite input raises here; else finite values overflowed
        return out.astype(np.float32, copy=False)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        bias, matrix = self._tensors(x)
        if self.standardize == "batch":
            return _batch_standardize(x) @ matrix
        return x @ matrix if bias is None else torch.addmm(bias, x, matrix)

