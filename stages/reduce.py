"""``reduce`` stage: fit a reducer (PCA, random projection, h-NNE, UMAP or a plugin's method: every
registered :class:`~stages.projections.methods.Method` whose stage is ``reduce``) on the cached train
tokens (method.md §10.3–10.5).

The method and output width come from the ``projection`` section (``projection.method``,
``projection.dim``, ``projection.seed``); how to fit comes from the ``reduce`` section below (and from a
method's own section, e.g. ``umap.*``). The fit rows (``reduce.fit_subset``, ``fit_n``, ``subset_seed``)
are drawn as :mod:`stages.projections.fitdata` describes; the method's ``fit`` turns them into a
projection (its module says how):

- **PCA**: exact float64 moments in one streaming pass (``reduce.backend``: Dask, numpy, or the GPU
  through cupy or torch); all components are stored, so one PCA artifact serves every ``projection.dim``
  of a sweep (:func:`stages.projections.select.open_projection` narrows it). Also writes the
  explained-variance curve (``evr.json``, ``evr.csv``) and paper Figure 3 (``evr.png``).
- **RP**: seeded Gaussian matrix with orthonormal columns; with ``standardize=fit`` the mean/std come from
  the same moment pass.
- **h-NNE**, **UMAP**: a seeded subsample of the fit rows (``projection.seed``), a RAM guard
  (``ConfigError`` before anything is read), the fit. Their transform is expensive, so the projected
  train and val stores are materialised by default (``reduce.materialize``: None = the method's default).

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import write_json_atomic
from pipeline.config import register_section, setting
from pipeline.context import StageContext
from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from pipeline.params import Context, Derive, Exclude, Params
from pipeline.planner import Request
from pipeline.registry import register_stage
from stages.artifacts import ReduceArtifact
from stages.evaluation.figures import DPI, backbone_label
from stages.projections import BaseProjection, load_projection
from stages.projections.fitdata import MOMENT_BACKENDS, FitData, fit_subset, select_fit_rows
from stages.projections.hnne import HNNE_VERSIONS
from stages.projections.linear import STANDARDIZE_MODES
from stages.projections.methods import get_method, method_derived, method_exclusions, method_fields, methods
from stages.projections.pca import PCAProjection

if TYPE_CHECKING:
    from stages.store import TokenStore

token_store = lazy_module("stages.store")

FIT_SUBSETS = ("all", "images", "tokens")
HNNE_METRICS = ("cosine", "euclidean")


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
    materialize: bool | None = None  # write projected train/val stores; None = the method's default (h-NNE, UMAP)
    backend: str = setting("auto", runtime=True, choices=MOMENT_BACKENDS)  # moments: auto = GPU on cuda, else dask
    chunk_samples: int = setting(0, runtime=True, min=0)  # samples per fit block / Dask task; 0: about 16 MiB
    transform_samples: int = setting(64, runtime=True, min=1)  # samples per transform call when materialising


register_section("reduce", ReduceConfig)


def _materialize(cfg: Any) -> bool:
    flag = cfg.reduce.materialize
    return get_method(cfg.projection.method).materialize if flag is None else bool(flag)


def _check(cfg: Any, args: Any) -> None:
    method = get_method(cfg.projection.method)
    if method.stage != "reduce":
        raise ConfigError(f"projection.method={method.name!r}: the reduce stage fits one of "
                          f"{', '.join(m.name for m in methods('reduce'))}")
    if method.dim_required and cfg.projection.dim is None:
        raise ConfigError(f"projection.dim is required for projection.method={method.name} (e.g. projection.dim=24)")


def _exclusions() -> tuple[Exclude, ...]:
    return (
        Exclude(("projection.seed",), "the method's fit draws nothing at random",
                when=lambda cfg, args: not get_method(cfg.projection.method).seeded),
        Exclude(("projection.dim",), "one fit serves every dim (narrowed when read) unless its codes are stored",
                when=lambda cfg, args: get_method(cfg.projection.method).all_dims and not _materialize(cfg)),
        Exclude(("reduce.fit_n", "reduce.subset_seed"), "reduce.fit_subset=all fits on every token",
                when=lambda cfg, args: cfg.reduce.fit_subset == "all"),
        *method_fields("reduce"), *method_exclusions("reduce"))


REDUCE_PARAMS = Params(
    exclude=_exclusions, check=_check,
    derive=lambda: (Derive("materialize", lambda cfg, args: _materialize(cfg), replaces=("reduce.materialize",),
                           uses=("projection.method",)), *method_derived("reduce")),
    contexts=lambda: tuple(Context((f"projection.method={m.name}", *overrides))
                           for m in methods("reduce") for overrides in m.contexts))


def reduce_inputs(cfg: Any, args: dict[str, Any]) -> dict[str, Request]:
    inputs = {"tokens": Request("extract", cfg, {"split": "train"})}
    if _materialize(cfg):
        inputs["tokens_val"] = Request("extract", cfg, {"split": "val"})
    return inputs


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


@register_stage("reduce", kind="reducer", sections=("projection", "reduce"), params=REDUCE_PARAMS,
                inputs=reduce_inputs, resumable=True, make_target="make reduce")
def reduce(ctx: StageContext) -> None:
    """Fit a reducer (PCA, random projection, h-NNE, ...) on the train tokens (and materialise its codes)."""
    cfg = ctx.config
    method = get_method(cfg.projection.method)
    store = token_store.TokensArtifact(ctx.input("tokens").path).store
    h, w = store.grid
    fit = select_fit_rows(store.n, h * w, fit_subset(cfg.reduce)) if "fit_subset" in cfg.reduce else None
    result: dict[str, Any] = {"in_dim": store.dim}
    if fit is not None:
        result["fit"] = {**fit_subset(cfg.reduce), "n_samples": len(fit.samples), "n_tokens": fit.n_rows,
                         "store_samples": store.n}
    projection_dir = ctx.out / ReduceArtifact.PROJECTION
    for key in ctx.shards(["fit"]):  # a resumed run keeps the fit its materialised shards came from
        runtime = ctx.runtime.reduce
        data = FitData(store, fit, ctx.device, ctx.params, str(runtime.backend), int(runtime.chunk_samples))
        assert method.fit is not None  # the params check admits reduce methods only, and each has a fit
        projection, record = method.fit(data, cfg)
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
    if "seed" in cfg.projection:
        result["seeds"] = {"projection": int(cfg.projection.seed)}
    if ctx.params["materialize"]:
        dim = int(cfg.projection.dim) if cfg.projection.get("dim") is not None else None
        samples_per_call = 1 if cfg.reduce.standardize == "batch" else int(ctx.runtime.reduce.transform_samples)
        val = token_store.TokensArtifact(ctx.input("tokens_val").path).store
        if val.dim != store.dim:
            raise InputError(f"{val.path}: val tokens have width {val.dim}, train tokens {store.dim}")
        result["materialized"] = {
            split: materialize_split(ctx, split, src, projection_dir, dim, samples_per_call)
            for split, src in (("train", store), ("val", val))}
    ctx.record(**result)
