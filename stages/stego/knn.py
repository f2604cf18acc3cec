"""kNN math for STEGO positives (method.md §4): global descriptors and blocked cosine top-k.

Pure functions on arrays/tensors, except the ``nns`` npz helpers (STEGO's file format) and the
streaming helper that reads a token store.

Ordering contract of :func:`topk_neighbors`: each row's neighbours are sorted by similarity descending,
ties broken by the smaller column index, and the row itself is forced into column 0 (also when other
rows duplicate it). Both are exact: candidates are ranked by a unique int64 key
``(order-preserving int of the float32 similarity) * 2**32 + (2**32 - 1 - column)``, so ``torch.topk``
never has to break a tie.

Two exact implementations share that contract. On CPU (the default) the similarity matrix is computed in
square blocks of the upper triangle only (``S[i,j]`` serves row ``i`` and row ``j``: half the sgemm work of
the full product) by numpy's BLAS, and a compiled selection pass (numba) keeps each row's running top-k
keys, testing every similarity against the row's current k-th key with a vectorised max over chunks, so
selection costs a fraction of the product (benchmarks/bench_knn.py: faster than faiss ``IndexFlatIP``).
On other torch devices (CUDA) blocks of the full product go through ``torch.topk`` (per column block a
float ``topk`` preselects candidates; rows whose k-th value is tied with an excluded one are ranked by key
over the whole block).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from pipeline.errors import ConfigError, InputError
from pipeline.prefetch import prefetch
from pipeline.lazy import lazy_module

if TYPE_CHECKING:
    from stages.store import TokenStore

STEGO_NUM_NEIGHBORS = 30
"""Columns of STEGO's ``nns`` files (``torch.topk(sims, 30)``)."""

_LOW = 2**32

torch = lazy_module("torch")


def global_descriptors(tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``[N,h,w,D]`` tokens (any float dtype) → ``[N,D]`` float32: spatial mean, then L2-normalised.

    Returns the same kind (numpy / torch, torch on the input's device) as given. All-zero descriptors
    stay zero (norm clamped at 1e-12, as ``torch.nn.functional.normalize``).
    """
    if tokens.ndim != 4:
        raise InputError(f"tokens: expected a [N,h,w,D] array, got shape {tuple(tokens.shape)}")
    if isinstance(tokens, torch.Tensor):
        mean = tokens.to(torch.float32).mean(dim=(1, 2))
        return torch.nn.functional.normalize(mean, dim=1)
    mean = np.asarray(tokens).mean(axis=(1, 2), dtype=np.float32)
    return _normalize_np(mean)


def _normalize_np(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True, dtype=np.float32))
    return (x / np.maximum(norm, np.float32(1e-12))).astype(np.float32)


def descriptors_from_store(store: TokenStore | str | os.PathLike[str], batch_size: int = 64,
                           workers: int = 4) -> np.ndarray:
    """Global descriptors ``[N,D]`` float32 of every sample of a token store: consecutive batches of
    ``batch_size`` samples, each read and pooled by one of ``workers`` threads (:mod:`pipeline.prefetch`).
    Four reads of 64 ViT-S/8 samples in flight read a store from disk at 1.02× two parallel ``cat``s of
    its files (two reads of 256: 0.78×), holding half the memory."""
    from stages.store import (  # zarr only where a store is read
        TokenStore,
        open_token_store,
    )

    ts = store if isinstance(store, TokenStore) else open_token_store(store)
    out = np.empty((ts.n, ts.dim), dtype=np.float32)

    def pooled(start: int) -> np.ndarray:
        return spatial_means(ts.get("tokens", np.arange(start, min(start + batch_size, ts.n))))

    starts = range(0, ts.n, batch_size)
    with prefetch(pooled, starts, workers=workers, depth=2 * max(1, workers), name="knn-read") as means:
        for start, mean in zip(starts, means):
            out[start:start + len(mean)] = mean
    return _normalize_np(out)


def spatial_means(tokens: np.ndarray) -> np.ndarray:
    """``[N,h,w,D]`` tokens → ``[N,D]`` float32 means over ``h, w``, bit for bit
    ``tokens.mean(axis=(1, 2), dtype=np.float32)``: each sample is cast to float32 into one reused buffer
    (the store's cast; numpy's own float16 conversion is several times slower) and summed row by row in
    the same order, then divided by ``h·w``."""
    from stages.store import cast_into  # zarr only where a store is read

    n, h, w, d = tokens.shape
    out = np.empty((n, d), dtype=np.float32)
    buf = np.empty((h * w, d), dtype=np.float32)
    for i in range(n):
        cast_into(buf, tokens[i].reshape(h * w, d))
        buf.sum(axis=0, out=out[i])
    out /= np.float32(h * w)
    return out


def _sort_keys(sims: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordering (similarity desc, column asc); ``sims`` float32 [b,c], ``cols`` int64 [c]."""
    bits = (sims + 0.0).contiguous().view(torch.int32)  # + 0.0 folds -0.0 into +0.0
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return mono * _LOW + (_LOW - 1 - cols)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = torch.div(keys, _LOW, rounding_mode="floor")
    cols = _LOW - 1 - (keys - hi * _LOW)
    bits = hi.to(torch.int32)
    sims = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)
    return cols, sims


def _block_topk_keys(sims: torch.Tensor, c0: int, k: int) -> torch.Tensor:
    """Keys of each row's exact top-``k`` (by similarity desc, column asc) within one column block.

    Fast path: a float ``topk``; its set is exact unless the k-th value is tied with a value left out,
    so only rows with such a boundary tie are re-ranked over the whole block by the unique keys.
    """
    c = sims.shape[1]
    cols = torch.arange(c0, c0 + c, device=sims.device)
    kk = min(k, c)
    if kk == c:
        return _sort_keys(sims, cols)
    vals, pos = torch.topk(sims, kk, dim=1, sorted=False)
    keys = _sort_keys(vals, pos + c0)
    kth = vals.min(dim=1, keepdim=True).values
    tied = ((sims >= kth).sum(dim=1) != kk).nonzero().flatten()
    if tied.numel():
        keys[tied] = torch.topk(_sort_keys(sims[tied], cols), kk, dim=1).values
    return keys


def topk_neighbors(
    descriptors: ArrayLike | torch.Tensor,
    k: int,
    block_size: int = 2048,
    device: str | torch.device | None = None,
    *,
    return_similarities: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Cosine top-``k`` neighbours of every row among all rows (self included, in column 0).

    ``descriptors`` ``[N,D]`` are L2-normalised here (a no-op up to rounding for the output of
    :func:`global_descriptors`); similarity = dot product, as STEGO. Rows are compared in blocks of
    ``block_size`` × ``block_size`` with a running top-k, so memory is O(block_size² + N·k), never N×N.
    ``device``: torch device for the products (None or "cpu": the CPU path of the module docstring).
    Returns int64 ``[N,k]`` indices (see the module docstring for the ordering), and with
    ``return_similarities`` also float32 ``[N,k]`` similarities (column 0 = self-similarity).
    """
    x = descriptors if isinstance(descriptors, torch.Tensor) else torch.as_tensor(np.asarray(descriptors))
    if x.ndim != 2:
        raise InputError(f"descriptors: expected a [N,D] array, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"knn k={k} is invalid: must be in [1, N={n}] (N = number of descriptors)")
    if block_size < 1:
        raise ConfigError(f"knn block_size={block_size} is invalid: must be a positive integer")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    x = x.to(device=dev, dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise InputError("descriptors: contain NaN or inf values")
    x = torch.nn.functional.normalize(x, dim=1)
    if dev.type == "cpu":
        keys = _topk_keys_cpu(x.numpy(), k, block_size)
        cols, vals = _decode_keys(torch.from_numpy(keys))
        vals[:, 0] = (x * x).sum(dim=1)  # column 0 is self; report its true similarity
        nns, sims_out = cols, vals
    else:
        nns, sims_out = _topk_torch(x, k, block_size)
    if return_similarities:
        return nns.numpy(), sims_out.numpy()
    return nns.numpy()


def _topk_keys_cpu(x: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Each row's top-``k`` sort keys, descending (``[N,k]`` int64), from the upper-triangle blocks of ``x xᵀ``."""
    from stages.stego import knn_select  # numba compiles (or loads its cache) only where kNN runs

    n = x.shape[0]
    best = np.full((n, k), np.iinfo(np.int64).min, dtype=np.int64)
    buf = np.empty(min(block_size, n) ** 2, dtype=np.float32)
    for r0 in range(0, n, block_size):
        rows = x[r0:r0 + block_size]
        for c0 in range(r0, n, block_size):
            cols = x[c0:c0 + block_size]
            sims = buf[:len(rows) * len(cols)].reshape(len(rows), len(cols))
            np.matmul(rows, cols.T, out=sims)
            bits = sims.view(np.int32)
            knn_select.select_rows(bits, r0, c0, best)
            if c0 != r0:  # the diagonal block already holds both (i, j) and (j, i)
                knn_select.select_columns(bits, r0, c0, best)
    return best


def _topk_torch(x: torch.Tensor, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nns, sims)`` on ``x``'s torch device: blocks of the full product, merged with ``torch.topk``."""
    n, dev = x.shape[0], x.device
    nns = torch.empty((n, k), dtype=torch.int64)
    sims_out = torch.empty((n, k), dtype=torch.float32)
    with torch.inference_mode():
        for r0 in range(0, n, block_size):
            r1 = min(r0 + block_size, n)
            rows = x[r0:r1]
            best = torch.empty((r1 - r0, 0), dtype=torch.int64, device=dev)
            for c0 in range(0, n, block_size):
                c1 = min(c0 + block_size, n)
                sims = rows @ x[c0:c1].T
                lo, hi = max(r0, c0), min(r1, c1)
                if lo < hi:  # force self to the top
                    diag = torch.arange(lo, hi, device=dev)
                    sims[diag - r0, diag - c0] = float("inf")
                merged = torch.cat([best, _block_topk_keys(sims, c0, k)], dim=1)
                best = torch.topk(merged, min(k, merged.shape[1]), dim=1, sorted=True).values
            cols, vals = _decode_keys(best)
            vals[:, 0] = (rows * rows).sum(dim=1)  # column 0 is self; report its true similarity
            nns[r0:r1] = cols.cpu()
            sims_out[r0:r1] = vals.cpu()
    return nns, sims_out


def save_nns_npz(path: str | os.PathLike[str], nns: ArrayLike, similarities: ArrayLike | None = None) -> Path:
    """Write STEGO's kNN file: ``np.savez_compressed`` with key ``nns`` (int64 ``[N,K]``).

    ``similarities`` (float32 ``[N,K]``), when given, are stored under key ``similarities`` (STEGO ignores
    it). ``.npz`` is appended to ``path`` if missing (numpy's rule); the written path is returned.
    """
    arr = np.asarray(nns)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"nns: expected an integer [N,K] array, got {arr.dtype}{list(arr.shape)}")
    payload = {"nns": arr.astype(np.int64)}
    if similarities is not None:
        sims = np.asarray(similarities, dtype=np.float32)
        if sims.shape != arr.shape:
            raise InputError(f"similarities: shape {sims.shape} differs from nns shape {arr.shape}")
        payload["similarities"] = sims
    out = Path(path)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    np.savez_compressed(out, **payload)
    return out


def load_nns_npz(path: str | os.PathLike[str], expected_n: int | None = None) -> np.ndarray:
    """Read the ``nns`` int64 ``[N,K]`` array of a STEGO kNN file; check ``N == expected_n`` if given."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"kNN file {p}: does not exist (run the knn stage first)")
    try:
        with np.load(p) as data:
            if "nns" not in data:
                raise InputError(f"kNN file {p}: has no array 'nns' (keys: {', '.join(data.files)})")
            nns = data["nns"]
    except (OSError, ValueError) as exc:
        raise InputError(f"kNN file {p}: not a readable npz file ({exc})") from exc
    if nns.ndim != 2 or not np.issubdtype(nns.dtype, np.integer):
        raise InputError(f"kNN file {p}: 'nns' is {nns.dtype}{list(nns.shape)}, expected int64 [N,K]")
    if expected_n is not None and nns.shape[0] != expected_n:
        raise InputError(f"kNN file {p}: has {nns.shape[0]} rows but the dataset has {expected_n} samples")
    return nns.astype(np.int64, copy=False)
