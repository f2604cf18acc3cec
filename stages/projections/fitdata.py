"""The data a reducer is fitted on: which token rows (by sample), read in blocks, moments on a backend.

Fit rows are drawn from the flattened train tokens ``[N*h*w, D]`` (``reduce.fit_subset``): ``images``:
``fit_n`` samples chosen with ``reduce.subset_seed``; ``tokens``: ``fit_n`` token rows; ``all``: every
token. Only the chunks (samples) holding selected rows are read. A method's fit
(:attr:`stages.projections.methods.Method.fit`) gets a :class:`FitData`: exact moments of the fit rows
(PCA, RP), or a seeded subsample of them read into memory (h-NNE, UMAP).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from pipeline.prefetch import prefetch
from stages.projections.linear import PCAMoments, accumulate_moments, pca_moments_dask

if TYPE_CHECKING:
    from stages.store import TokenStore

token_store = lazy_module("stages.store")

MOMENT_BACKENDS = ("auto", "numpy", "dask", "cupy", "torch")
"""``reduce.backend``: ``auto`` = cupy (else torch) when the stage runs on cuda, else dask."""
_CHUNK_BYTES = 2**24  # float16 bytes per fit block: 16 MiB, 64 MiB once upcast to float64


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


@dataclass(frozen=True)
class FitRows:
    """Rows of the flattened tokens ``[N*h*w, D]`` to fit on: sorted ``samples``, and sorted global
    ``rows`` (None: every row of those samples)."""

    samples: np.ndarray
    rows: np.ndarray | None
    tokens_per_sample: int

    @property
    def n_rows(self) -> int:
        return len(self.samples) * self.tokens_per_sample if self.rows is None else len(self.rows)


def fit_subset(reduce: Any) -> dict[str, Any]:
    """The fit subset named by a ``reduce`` config section: ``{"subset", "n", "seed"}`` (only ``subset``
    for ``all``)."""
    if reduce.fit_subset == "all":
        return {"subset": "all"}
    return {"subset": str(reduce.fit_subset), "n": int(reduce.fit_n), "seed": int(reduce.subset_seed)}


def select_fit_rows(n: int, tokens_per_sample: int, fit: dict[str, Any]) -> FitRows:
    """The fit subset (:func:`fit_subset`) of an ``n``-sample store."""
    if fit["subset"] == "all":
        return FitRows(np.arange(n, dtype=np.int64), None, tokens_per_sample)
    if fit["subset"] == "images":
        return FitRows(sample_token_rows(n, fit["n"], fit["seed"]), None, tokens_per_sample)
    rows = sample_token_rows(n * tokens_per_sample, fit["n"], fit["seed"])
    return FitRows(np.unique(rows // tokens_per_sample), rows, tokens_per_sample)


def subsample_rows(fit: FitRows, n_wanted: int, seed: int) -> FitRows:
    """``n_wanted`` rows of ``fit`` drawn with ``seed`` (all of them if it has no more)."""
    pick = sample_token_rows(fit.n_rows, n_wanted, seed)
    if fit.rows is not None:
        rows = fit.rows[pick]
    else:
        hw = fit.tokens_per_sample
        rows = fit.samples[pick // hw] * hw + pick % hw
    return FitRows(np.unique(rows // fit.tokens_per_sample), rows, fit.tokens_per_sample)


def fit_parts(fit: FitRows, samples_per_part: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Split ``fit`` into read tasks ``(samples, local rows or None)`` of at most ``samples_per_part`` samples;
    local rows index the part's ``[len(samples)*h*w, D]`` token block."""
    hw = fit.tokens_per_sample
    parts = []
    for start in range(0, len(fit.samples), samples_per_part):
        samples = fit.samples[start : start + samples_per_part]
        if fit.rows is None:
            parts.append((samples, None))
            continue
        lo, hi = np.searchsorted(fit.rows, [samples[0] * hw, (samples[-1] + 1) * hw])
        rows = fit.rows[lo:hi]
        local = np.searchsorted(samples, rows // hw) * hw + rows % hw
        parts.append((samples, local))
    return parts


def read_part(store_path: str, samples: np.ndarray, local_rows: np.ndarray | None) -> np.ndarray:
    """:func:`part_rows` of the store at ``store_path`` (a dask task opens the store itself)."""
    return part_rows(token_store.open_token_store(store_path), samples, local_rows)


def part_rows(store: TokenStore, samples: np.ndarray, local_rows: np.ndarray | None) -> np.ndarray:
    """Float16 token rows ``[m, D]`` of one fit part (reads only the parts' samples)."""
    block = store.get("tokens", samples)
    block = block.reshape(-1, block.shape[-1])
    return block if local_rows is None else block[local_rows]


def _part_rows(part: tuple[np.ndarray, np.ndarray | None], hw: int) -> int:
    samples, local = part
    return len(samples) * hw if local is None else len(local)


def iter_parts(store: TokenStore, parts: list[tuple[np.ndarray, np.ndarray | None]]) -> Iterator[np.ndarray]:
    """Read the parts in order from the open ``store`` (its checked shard indexes reused), the next one
    prefetched in a background thread (:mod:`pipeline.prefetch`)."""
    with prefetch(lambda part: part_rows(store, *part), parts, workers=1, name="reduce-read") as blocks:
        yield from blocks


def dask_fit_array(store_path: str, parts: list[tuple[np.ndarray, np.ndarray | None]], hw: int, dim: int):  # -> da.Array
    """Lazy float16 ``[rows, D]`` dask array of the fit rows, one block (task) per part."""
    import dask
    import dask.array as da

    blocks = [da.from_delayed(dask.delayed(read_part)(store_path, *part), shape=(_part_rows(part, hw), dim),
                              dtype=np.float16) for part in parts]
    return da.concatenate(blocks, axis=0)


def fit_moments(store: TokenStore, fit: FitRows, backend: str, device: str, chunk_samples: int) -> tuple[PCAMoments, str]:
    """Exact moments of the fit rows and the backend that computed them (:data:`MOMENT_BACKENDS`)."""
    h, w = store.grid
    per_sample = max(1, _CHUNK_BYTES // (h * w * store.dim * 2)) if chunk_samples == 0 else chunk_samples
    parts = fit_parts(fit, per_sample)
    if backend == "auto":
        backend = "gpu" if device == "cuda" else "dask"
    if backend == "dask":
        return pca_moments_dask(dask_fit_array(store.path, parts, h * w, store.dim)), "dask"
    blocks = tqdm(iter_parts(store, parts), total=len(parts), unit="part", desc="reduce: moments", leave=False)
    if backend == "gpu":  # cupy when it sees the GPU, else torch on cuda (the check comes before any read)
        try:
            return accumulate_moments(blocks, "cupy"), "cupy"
        except ConfigError:
            return accumulate_moments(blocks, "torch"), "torch"
    return accumulate_moments(blocks, backend), backend


def read_rows(store: TokenStore, fit: FitRows, chunk_samples: int = 256) -> np.ndarray:
    """Every fit row as one float32 ``[rows, D]`` array (for fits that need the data in memory)."""
    out = np.empty((fit.n_rows, store.dim), np.float32)
    at = 0
    for block in iter_parts(store, fit_parts(fit, chunk_samples)):
        out[at : at + len(block)] = block
        at += len(block)
    return out


@dataclass
class FitData:
    """What a method's fit reads: the train ``store``, the fit ``rows`` (None: the method's config reads
    no tokens), the stage's ``device``, its id ``params`` (derived values) and its runtime moment
    ``backend`` / ``chunk_samples``."""

    store: TokenStore
    rows: FitRows | None
    device: str
    params: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    chunk_samples: int = 0

    def moments(self) -> tuple[PCAMoments, dict[str, Any]]:
        """Exact moments of the fit rows, and what to record (backend, token count, timing)."""
        if self.rows is None:
            raise ConfigError("this fit reads no tokens (no fit subset): it cannot compute moments")
        start = time.perf_counter()
        moments, backend = fit_moments(self.store, self.rows, self.backend, self.device, self.chunk_samples)
        wall = time.perf_counter() - start
        return moments, {"moments": {"backend": backend, "n_tokens": moments.count},
                         "timing": {"moments_s": round(wall, 3),
                                    "moments_tokens_per_s": round(moments.count / wall, 1) if wall > 0 else None}}

    def sample(self, n_wanted: int, seed: int) -> FitRows:
        """``n_wanted`` rows of the fit rows drawn with ``seed`` (the h-NNE / UMAP rule)."""
        if self.rows is None:
            raise ConfigError("this fit reads no tokens (no fit subset): it cannot sample them")
        return subsample_rows(self.rows, n_wanted, seed)

    def read(self, rows: FitRows) -> np.ndarray:
        """Rows as one float32 ``[n, D]`` array."""
        return read_rows(self.store, rows)
