"""``reduce`` stage: fit a PCA, random-projection or h-NNE reducer on the cached train tokens (method.md §10.3–10.5).

The method and output width come from the ``projection`` section (``projection.method`` pca | rp | hnne,
``projection.dim``, ``projection.seed``); how to fit comes from the ``reduce`` section below.

Fit data (``reduce.fit_subset``), drawn from the flattened train tokens ``[N*h*w, D]``:

- ``"images"`` (default, as stego-studies): ``fit_n`` samples chosen at random with ``reduce.subset_seed``
  (stego-studies took the first 5000 samples of a train store shuffled at write time, i.e. a fixed random
  subset; the subset seed is fixed too, so a sweep over ``projection.seed`` shares one PCA fit);
- ``"tokens"``: ``fit_n`` token rows chosen at random with ``reduce.subset_seed``;
- ``"all"``: every token.

Only the chunks (samples) holding selected rows are read.

- **PCA**: one streaming pass accumulating exact float64 moments (memory O(D²), independent of N) on Dask
  (one task per block of samples, tree-reduced; runs on the active Dask client if there is one), in numpy,
  or on the GPU (cupy / torch) — ``reduce.backend``. All components are stored, so one PCA artifact serves
  every ``projection.dim`` of a sweep (:func:`stages.projections.select.open_projection` narrows it); the dim is not a
  param. Also writes the explained-variance curve (``evr.json``, ``evr.csv``) and paper Figure 3
  (``evr.png``: cumulative explained variance vs fraction of components).
- **RP**: seeded Gaussian matrix with orthonormal columns; with ``standardize=fit`` the mean/std come from
  the same moment pass.
- **h-NNE**: ``reduce.hnne_tokens`` rows subsampled from the fit data with ``projection.seed`` (§10.5), a
  RAM guard (``ConfigError`` before anything is read), the fit. Because its transform is expensive, the
  projected train and val stores are materialised (``reduce.materialize``, default on for h-NNE only).

Materialised stores ``<artifact>/train.zarr`` and ``<artifact>/val.zarr`` are token stores in the
extract layout with ``dim`` = the projection's width: codes (float16) in ``tokens`` (and ``tokens_flip``
for val), the source's labels, rgb and ids, shard for shard. Consumers (probe, evaluate) may open them
with :func:`stages.store.open_token_store` and use an identity projection instead of transforming again;
the manifest's ``materialized`` field lists them. They are written shard by shard, resumably (a re-run
after a kill keeps finished shards and the saved fit), and in parallel on Dask when a client is available.
With ``standardize=batch`` every sample is standardised on its own tokens (its "batch"), so codes do not
depend on the shard layout.
"""
from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.config import register_section, setting
from pipeline.artifacts import write_json_atomic
from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from pipeline.prefetch import prefetch
from pipeline.context import StageContext
from pipeline.planner import Request
from pipeline.registry import register_stage
from stages.evaluation.figures import DPI, backbone_label
from stages.projections import BaseProjection, load_projection
from stages.projections.hnne import HNNE_VERSIONS, HNNEProjection, check_hnne_memory, sample_token_rows
from stages.projections.linear import STANDARDIZE_MODES, PCAMoments, accumulate_moments, pca_moments_dask
from stages.projections.pca import PCAProjection
from stages.projections.rp import RandomProjection
from stages.artifacts import ReduceArtifact
from stages.projections.select import check_method

if TYPE_CHECKING:
    from stages.store import TokenStore

token_store = lazy_module("stages.store")

REDUCE_METHODS = ("pca", "rp", "hnne")
FIT_SUBSETS = ("all", "images", "tokens")
BACKENDS = ("auto", "numpy", "dask", "cuml")
HNNE_METRICS = ("cosine", "euclidean")
_CHUNK_BYTES = 2**24  # float16 bytes per fit block: 16 MiB, 64 MiB once upcast to float64


@dataclass
class ReduceConfig:
    """How the ``reduce`` stage fits (``reduce.*``); method, dim and seed come from ``projection.*``."""

    fit_subset: str = setting("images", choices=FIT_SUBSETS)
    fit_n: int = setting(5000, min=1)  # images (fit_subset=images) or token rows (fit_subset=tokens) to fit on
    subset_seed: int = 0  # which images/tokens; fixed so that a projection.seed sweep shares one PCA fit
    standardize: str = setting("fit", choices=STANDARDIZE_MODES)  # stages.projections.linear docstring
    hnne_tokens: int = setting(1_000_000, min=1)  # h-NNE: token rows subsampled from the fit data (projection.seed)
    hnne_version: str = setting("v1", choices=HNNE_VERSIONS)  # v1: stego-studies' hnne layout
    hnne_metric: str = setting("cosine", choices=HNNE_METRICS)
    materialize: bool | None = None  # write projected train/val stores; None = only for hnne
    backend: str = setting("auto", runtime=True, choices=BACKENDS)  # auto: GPU if the stage runs on cuda, else dask
    chunk_samples: int = setting(0, runtime=True, min=0)  # samples per fit block / Dask task; 0: about 16 MiB
    transform_samples: int = setting(64, runtime=True, min=1)  # samples per transform call when materialising


register_section("reduce", ReduceConfig)


def _materialize(cfg: Any) -> bool:
    flag = cfg.reduce.materialize
    return cfg.projection.method == "hnne" if flag is None else bool(flag)


def reduce_params(cfg: Any, args: dict[str, Any]) -> dict[str, Any]:
    """What changes the reducer: method, standardisation, fit subset, and per method dim/seed/h-NNE settings."""
    method = check_method(cfg)
    if method not in REDUCE_METHODS:
        raise ConfigError(f"projection.method={method!r}: the reduce stage fits one of {', '.join(REDUCE_METHODS)}")
    r = cfg.reduce
    dim = cfg.projection.dim
    if method != "pca" and dim is None:
        raise ConfigError(f"projection.dim is required for projection.method={method} (e.g. projection.dim=24)")
    params: dict[str, Any] = {"method": method, "standardize": r.standardize}
    if method != "rp" or r.standardize == "fit":  # RP without fitted moments reads no tokens
        params["fit"] = {"subset": "all"} if r.fit_subset == "all" else {
            "subset": r.fit_subset, "n": int(r.fit_n), "seed": int(r.subset_seed)}
    if method != "pca" or _materialize(cfg):  # one PCA fit serves every dim unless its codes are stored
        params["dim"] = dim
    if method != "pca":
        params["seed"] = int(cfg.projection.seed)
    if method == "hnne":
        params["hnne"] = {"tokens": int(r.hnne_tokens), "version": r.hnne_version, "metric": r.hnne_metric}
    if _materialize(cfg):
        params["materialize"] = True
    return params


def reduce_inputs(cfg: Any, args: dict[str, Any]) -> dict[str, Request]:
    inputs = {"tokens": Request("extract", cfg, {"split": "train"})}
    if _materialize(cfg):
        inputs["tokens_val"] = Request("extract", cfg, {"split": "val"})
    return inputs


# --------------------------------------------------------------------------------------------------
# fit data: which rows, read by sample
# --------------------------------------------------------------------------------------------------


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


def select_fit_rows(n: int, tokens_per_sample: int, fit: dict[str, Any]) -> FitRows:
    """The fit subset of an ``n``-sample store (``fit`` = the ``params["fit"]`` dict)."""
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
    """Float16 token rows ``[m, D]`` of one fit part (reads only the parts' samples)."""
    store = token_store.open_token_store(store_path)
    block = store.get("tokens", samples)
    block = block.reshape(-1, block.shape[-1])
    return block if local_rows is None else block[local_rows]


def _part_rows(part: tuple[np.ndarray, np.ndarray | None], hw: int) -> int:
    samples, local = part
    return len(samples) * hw if local is None else len(local)


def iter_parts(store_path: str, parts: list[tuple[np.ndarray, np.ndarray | None]]) -> Iterator[np.ndarray]:
    """Read the parts in order, the next one prefetched in a background thread (:mod:`pipeline.prefetch`)."""
    with prefetch(lambda part: read_part(store_path, *part), parts, workers=1, name="reduce-read") as blocks:
        yield from blocks


def dask_fit_array(store_path: str, parts: list[tuple[np.ndarray, np.ndarray | None]], hw: int, dim: int):  # -> da.Array
    """Lazy float16 ``[rows, D]`` dask array of the fit rows, one block (task) per part."""
    import dask
    import dask.array as da

    blocks = [da.from_delayed(dask.delayed(read_part)(store_path, *part), shape=(_part_rows(part, hw), dim),
                              dtype=np.float16) for part in parts]
    return da.concatenate(blocks, axis=0)


def fit_moments(store: TokenStore, fit: FitRows, backend: str, device: str, chunk_samples: int) -> tuple[PCAMoments, str]:
    """Exact moments of the fit rows and the backend that computed them (see ``ReduceConfig.backend``)."""
    h, w = store.grid
    per_sample = max(1, _CHUNK_BYTES // (h * w * store.dim * 2)) if chunk_samples == 0 else chunk_samples
    parts = fit_parts(fit, per_sample)
    if backend == "auto":
        backend = "cuml" if device == "cuda" else "dask"
    if backend == "dask":
        return pca_moments_dask(dask_fit_array(store.path, parts, h * w, store.dim)), "dask"
    blocks = tqdm(iter_parts(store.path, parts), total=len(parts), unit="part", desc="reduce: moments", leave=False)
    if backend == "cuml":  # cupy on the GPU, else torch on cuda (reducers.accumulate_moments "auto")
        return accumulate_moments(blocks, "auto" if device == "cuda" else "cuml"), "gpu"
    return accumulate_moments(blocks, "numpy"), "numpy"


def read_rows(store: TokenStore, fit: FitRows, chunk_samples: int = 256) -> np.ndarray:
    """Every fit row as one float32 ``[rows, D]`` array (for fits that need the data in memory)."""
    out = np.empty((fit.n_rows, store.dim), np.float32)
    at = 0
    for block in iter_parts(store.path, fit_parts(fit, chunk_samples)):
        out[at : at + len(block)] = block
        at += len(block)
    return out


# --------------------------------------------------------------------------------------------------
# outputs: Figure 3, materialised stores
# --------------------------------------------------------------------------------------------------


def write_evr(pca: PCAProjection, out: Path, title: str) -> dict[str, Any]:
    """Write ``evr.json``, ``evr.csv`` and ``evr.png`` (cumulative EVR vs component fraction, paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fraction, cumulative = pca.cumulative_evr_curve()
    grid, interp = pca.cumulative_evr_curve(num_points=pca.in_dim)
    thresholds = {f"{t:g}": int(np.searchsorted(cumulative, t - 1e-12) + 1) for t in (0.5, 0.8, 0.9, 0.95, 0.99)}
    thresholds = {k: v for k, v in thresholds.items() if v <= pca.n_components}
    summary = {"in_dim": pca.in_dim, "n_components": pca.n_components, "n_samples": pca.n_samples,
               "standardize": pca.standardize, "components_for_evr": thresholds}
    data = {**summary, "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
            "explained_variance": pca.explained_variance.tolist(), "fraction": fraction.tolist(),
            "cumulative": cumulative.tolist(),
            "interpolated": {"fraction": grid.tolist(), "cumulative": interp.tolist()}}
    write_json_atomic(out / ReduceArtifact.EVR, data)
    with open(out / "evr.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["component", "fraction", "explained_variance_ratio", "cumulative"])
        for k, (f, r, c) in enumerate(zip(fraction, pca.explained_variance_ratio, cumulative), start=1):
            writer.writerow([k, f"{f:.8g}", f"{r:.10g}", f"{c:.10g}"])
    fig, ax = plt.subplots(figsize=(5.0, 3.8), dpi=DPI)
    ax.plot(grid, interp, lw=1.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("fraction of PCA components (of $D_{ViT}$)")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "evr.png")
    plt.close(fig)
    return summary


def _open_projection(directory: str, dim: int | None) -> BaseProjection:
    """The saved projection narrowed to ``dim``, loaded once per process and version of its files."""
    stamp = tuple(f.stat().st_mtime_ns for f in sorted(Path(directory).iterdir()))
    return _cached_projection(directory, dim, stamp)


@lru_cache(maxsize=4)
def _cached_projection(directory: str, dim: int | None, stamp: tuple[int, ...]) -> BaseProjection:
    projection = load_projection(Path(directory))
    return projection if dim is None or dim == projection.dim else projection.with_dim(dim)  # type: ignore[attr-defined]


def _project(projection: BaseProjection, tokens: np.ndarray, samples_per_call: int) -> np.ndarray:
    """Codes ``[k, h, w, d]`` of float16 tokens ``[k, h, w, D]``, ``samples_per_call`` samples per transform."""
    k, h, w, d_in = tokens.shape
    out = np.empty((k, h, w, projection.dim), np.float32)
    for s in range(0, k, samples_per_call):
        block = tokens[s : s + samples_per_call].astype(np.float32)
        out[s : s + len(block)] = projection.transform(block.reshape(-1, d_in)).reshape(len(block), h, w, -1)
    return out


def materialize_shard(projection_dir: str, dim: int | None, src_path: str, dst_path: str, shard: int,
                      samples_per_call: int) -> int:
    """Project shard ``shard`` of token store ``src_path`` into the same shard of ``dst_path``; returns
    its sample count. Labels, rgb and ids are copied; ``tokens_flip`` is projected too when present."""
    projection = _open_projection(projection_dir, dim)
    src = token_store.open_token_store(src_path)
    a, b = src.shard_ranges()[shard]
    idx = np.arange(a, b)
    token_store.write_shard(
        dst_path, shard,
        tokens=_project(projection, src.get("tokens", idx), samples_per_call),
        tokens_flip=_project(projection, src.get("tokens_flip", idx), samples_per_call) if src.has_flip else None,
        labels=src.get_labels(idx), rgb=src.get_rgb(idx) if src.has_rgb else None, ids=src.ids[a:b],
    )
    return b - a


def materialize_split(ctx: StageContext, split: str, src: TokenStore, projection_dir: Path, dim: int | None,
                      samples_per_call: int) -> dict[str, Any]:
    """Write ``<out>/<split>.zarr`` (resumable per shard; parallel on Dask when a client exists)."""
    dst = ctx.out / f"{split}.zarr"
    projection = _open_projection(str(projection_dir), dim)
    for key in ctx.shards([f"{split}-store"]):  # creation is a step of its own: a kill mid-way restarts it
        shutil.rmtree(dst, ignore_errors=True)
        attrs = {**src.attrs, "projection": {"kind": projection.kind, "dim": projection.dim,
                                             "reducer": ctx.task.id, "source_split": split}}
        token_store.create_token_store(dst, n=src.n, grid=src.grid, dim=projection.dim, label_hw=src.label_hw,
                                       shard_size=src.shard_size, with_rgb=src.has_rgb, with_flip=src.has_flip, attrs=attrs)
        ctx.shard_finished(key)
    keys = {f"{split}-{i:05d}": i for i in range(len(src.shard_ranges()))}
    todo = list(ctx.shards(keys))
    args = (str(projection_dir), dim, src.path, str(dst))
    start, n_samples = time.perf_counter(), 0
    jobs = {key: (*args, keys[key], samples_per_call) for key in todo}
    with tqdm(total=len(todo), unit="shard", desc=f"reduce: {split}", leave=False) as bar:
        for _, n in ctx.map_shards(materialize_shard, jobs):
            n_samples += n
            bar.update()
    wall = time.perf_counter() - start
    h, w = src.grid
    store = token_store.open_token_store(dst)  # checks the layout of what was written
    return {"path": f"{split}.zarr", "n": store.n, "dim": store.dim, "shards": len(keys),
            "shards_computed": len(todo), "parallel": ctx.shard_executor,
            "tokens_per_s": round(n_samples * h * w / wall, 1) if n_samples and wall > 0 else None}


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


def _fit(ctx: StageContext, store: TokenStore, fit: FitRows | None) -> tuple[BaseProjection, dict[str, Any]]:
    p, r = ctx.params, ctx.runtime.reduce
    record: dict[str, Any] = {}
    if p["method"] == "hnne":
        assert fit is not None  # params always carry a fit subset for hnne
        sub = subsample_rows(fit, p["hnne"]["tokens"], p["seed"])
        check_hnne_memory(sub.n_rows, store.dim)  # before reading anything
        start = time.perf_counter()
        x = read_rows(store, sub)
        projection: BaseProjection = HNNEProjection.fit(
            x, dim=p["dim"], seed=p["seed"], version=p["hnne"]["version"], metric=p["hnne"]["metric"],
            standardize=p["standardize"])
        record["hnne"] = {"n_tokens": sub.n_rows, "n_samples": len(sub.samples), "n_clusters": projection.n_clusters}
        record["timing"] = {"hnne_fit_s": round(time.perf_counter() - start, 3)}
        return projection, record
    moments = None
    if fit is not None:
        start = time.perf_counter()
        moments, backend = fit_moments(store, fit, r.backend, ctx.device, int(r.chunk_samples))
        wall = time.perf_counter() - start
        record["moments"] = {"backend": backend, "n_tokens": moments.count}
        record["timing"] = {"moments_s": round(wall, 3),
                            "moments_tokens_per_s": round(moments.count / wall, 1) if wall > 0 else None}
    if p["method"] == "pca":
        assert moments is not None  # params always carry a fit subset for pca
        return PCAProjection.from_moments(moments, standardize=p["standardize"]), record
    return RandomProjection.fit(store.dim, p["dim"], p["seed"], standardize=p["standardize"], moments=moments), record


@register_stage("reduce", version="1", kind="reducer", sections=("projection", "reduce"), params=reduce_params, inputs=reduce_inputs,
                resumable=True, make_target="make reduce")
def reduce(ctx: StageContext) -> None:
    """Fit a PCA / random projection / h-NNE reducer on the train tokens (and materialise h-NNE codes)."""
    p = ctx.params
    store = token_store.TokensArtifact(ctx.input("tokens").path).store
    h, w = store.grid
    fit = select_fit_rows(store.n, h * w, p["fit"]) if "fit" in p else None
    result: dict[str, Any] = {"in_dim": store.dim}
    if fit is not None:
        result["fit"] = {**p["fit"], "n_samples": len(fit.samples), "n_tokens": fit.n_rows, "store_samples": store.n}
    projection_dir = ctx.out / ReduceArtifact.PROJECTION
    for key in ctx.shards(["fit"]):  # a resumed run keeps the fit its materialised shards came from
        projection, record = _fit(ctx, store, fit)
        projection.save(projection_dir)
        if isinstance(projection, PCAProjection):
            backbone = backbone_label(store.attrs.get("backbone"), store.attrs.get("weights_tag")) or "backbone"
            title = f"PCA of {store.attrs.get('dataset', '')} train tokens\n{backbone}"
            record["evr"] = write_evr(projection, ctx.out, title)
        ctx.record(fit_timing=record.pop("timing", {}))  # the manifest's: fit.json holds only what the fit made
        write_json_atomic(ctx.out / ReduceArtifact.FIT, record)
        ctx.shard_finished(key)
    result |= ReduceArtifact(ctx.out).read_json(ReduceArtifact.FIT)
    projection = load_projection(projection_dir)
    result["dim"] = projection.dim
    if "seed" in p:
        result["seeds"] = {"projection": p["seed"]}
    if p.get("materialize"):
        samples_per_call = 1 if p["standardize"] == "batch" else int(ctx.runtime.reduce.transform_samples)
        val = token_store.TokensArtifact(ctx.input("tokens_val").path).store
        if val.dim != store.dim:
            raise InputError(f"{val.path}: val tokens have width {val.dim}, train tokens {store.dim}")
        result["materialized"] = {
            split: materialize_split(ctx, split, src, projection_dir, p.get("dim"), samples_per_call)
            for split, src in (("train", store), ("val", val))}
    ctx.record(**result)
