"""``evaluate`` stage: probes on the cached val split → confusion matrices, scores, optional dense CRF.

Protocol (method.md §6.1, §7, §9.2): for each val sample, ``code = projection(tokens)`` at feature resolution
(with ``evaluate.flip_tta``: ``(code + flip_W(projection(tokens_flip))) / 2``), bilinearly upsampled
(``align_corners=False``) to the label size; linear probe → argmax, cluster probe → argmax cosine. The
linear confusion matrix is scored as it stands, the cluster one after Hungarian matching
(:func:`stages.evaluation.metrics.scores`). With ``evaluate.crf`` both probes' predictions are also refined by the
dense CRF (:func:`stages.evaluation.crf.crf_map`, spawn pool, per-image timeout) from the unaries
``log_softmax(logits)`` (linear) and ``log_softmax(2·cos)`` (cluster), then scored the same way; the CRF
sees the reference's pixels (``evaluate.crf_pixels=reference``: the stored uint8 image through the
normalise → un-normalise → truncate round trip, BGR; ``raw``: the stored values). The
CRF pass is resumable per token-store shard: each finished shard's CRF predictions are kept in the
staging folder (``crf_shards/``, removed before publishing), so a killed run redoes only unfinished
shards. An image whose CRF fails or times out keeps its un-refined prediction and is listed in the
manifest (``crf_failed``).

Artifact (kind ``eval``):

* ``metrics.json``: ``{"protocol": {...}, "scores": {"linear": S, "cluster": S[, "linear_crf": S,
  "cluster_crf": S]}}`` where ``S = {"miou", "accuracy", "iou", "precision", "recall"}`` (mIoU and
  accuracy ×100, per-class lists as fractions, ``null`` where undefined) plus ``"assignment"`` (class
  of each cluster, -1 unmatched) for the cluster entries. ``protocol`` holds dataset, split,
  index_id (the val ``prepare`` artifact), tokens_id, backbone, weights_tag, resolution ``[H, W]``,
  feature_grid, crf, crf_pixels (null without CRF), flip_tta, drop_extra_clusters, probe_id, n_classes,
  n_clusters, seed, projection ``{method, id, kind, dim, requested_dim}`` (``requested_dim`` null: the
  method's default, e.g. the preset's ``head.dim`` for STEGO), class_names, n_images.
* ``confusion_<entry>.npy``: int64 ``[n_clusters or n_classes, n_classes]`` raw ``[prediction, truth]``
  counts for each entry of ``scores``.
* ``examples/<k>-<id>.png``: titled columns image / ground truth / linear / cluster (clusters mapped to
  classes by the Hungarian assignment) [/ linear + CRF / cluster + CRF], colours from
  :func:`stages.evaluation.figures.palette` (ignore and unmatched pixels black) with a colour → class
  legend of the classes shown.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.artifacts import json_safe, stage_of, write_json_atomic
from pipeline.config import register_section, setting
from pipeline.errors import ArtifactError, InputError, StageError
from pipeline.lazy import lazy_module
from pipeline.params import Exclude, Params
from pipeline.prefetch import prefetch
from pipeline.context import StageContext
from pipeline.planner import Request
from pipeline.registry import register_stage
from stages.artifacts import EvalArtifact, ProbesArtifact
from stages.evaluation.crf import PIXEL_MODES, CrfResult, crf_map
from stages.evaluation.figures import backbone_label, class_legend, colorize, palette, save_panels
from stages.projections import BaseProjection
from stages.projections.select import NO_DIM_WITHOUT_PROVIDER, open_projection, projection_request, reader_contexts

log = logging.getLogger("stegopipe")

if TYPE_CHECKING:
    from stages.evaluation.probes import Probes
    from stages.store import TokenStore

torch = lazy_module("torch")
metrics = lazy_module("stages.evaluation.metrics")
probes_lib = lazy_module("stages.evaluation.probes")
token_store = lazy_module("stages.store")

__all__ = ["EvaluateConfig", "upsampled_codes", "example_panels", "evaluate_stage"]

PROBE_NAMES = ("linear", "cluster")
CRF_DIR = "crf_shards"
MICRO_BATCH_BYTES = 256 << 20  # bound on the upsampled code + unaries held at once
PANEL_TITLES = {"linear": "linear probe", "cluster": "cluster probe", "linear_crf": "linear + CRF",
                "cluster_crf": "cluster + CRF"}


@dataclass
class EvaluateConfig:
    """Evaluation on the val split (``evaluate.*``)."""

    crf: bool = False  # also report dense-CRF-refined scores
    crf_pixels: str = setting("reference", choices=PIXEL_MODES)  # the image the CRF sees (crf.crf_pixels)
    flip_tta: bool = False  # average the code with the flipped image's code (eval_segmentation.py)
    examples: int = setting(4, min=0)  # example PNGs (evenly spaced val samples)
    drop_extra_clusters: bool = False  # reference scoring of extra clusters (method.md §6.2-6.3)
    crf_workers: int = setting(2, runtime=True)  # CRF processes (<= 1: serial in the stage process)
    crf_timeout_s: float = setting(120.0, runtime=True, above=0)  # per-image CRF limit in the pool
    batch_size: int = setting(8, runtime=True, min=1)  # val samples per projection batch


register_section("evaluate", EvaluateConfig)


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------


def upsampled_codes(projection: BaseProjection, tokens: torch.Tensor, size: tuple[int, int],
                    tokens_flip: torch.Tensor | None = None) -> torch.Tensor:
    """Eval code of ``tokens [B, h, w, D]``: ``projection`` at feature resolution (flip-TTA average with
    ``flip_W(projection(tokens_flip))`` when given), bilinearly upsampled to ``size`` → ``[B, d, H, W]``."""
    code = projection.transform_map(tokens.permute(0, 3, 1, 2))
    if tokens_flip is not None:
        code = (code + projection.transform_map(tokens_flip.permute(0, 3, 1, 2)).flip(-1)) / 2
    return probes_lib.upsample_code(code, size)


def example_panels(image: np.ndarray, label: np.ndarray | None, preds: Mapping[str, np.ndarray],
                   assignments: Mapping[str, np.ndarray], colours: np.ndarray,
                   class_names: Sequence[str] | None) -> tuple[list[tuple[str, np.ndarray]],
                                                                list[tuple[str, np.ndarray]]]:
    """Titled RGB panels (image, ground truth unless ``label`` is None, then each entry of ``preds``:
    ``linear``, ``cluster``, ``linear_crf``, ``cluster_crf``; cluster ids mapped to classes by
    ``assignments[entry]`` where there is one, else shown as they are) and the colour → name legend of the
    ids shown."""
    ids = [] if label is None else [("ground truth", label)]
    for entry, pred in preds.items():
        if entry.startswith("cluster") and entry in assignments:
            pred = metrics.map_clusters(pred.astype(np.int64), assignments[entry])
        ids.append((PANEL_TITLES[entry], pred))
    panels = [("image", image)] + [(title, colorize(x, colours)) for title, x in ids]
    return panels, class_legend([x for _, x in ids], colours, class_names)


def _score_entry(conf: np.ndarray, hungarian: bool, drop_extra: bool) -> tuple[dict[str, Any], np.ndarray]:
    s = metrics.scores(conf, hungarian=hungarian, drop_extra_clusters=drop_extra)
    entry: dict[str, Any] = {"miou": json_safe(s["miou"]), "accuracy": json_safe(s["accuracy"])}
    for key in ("iou", "precision", "recall"):
        entry[key] = [json_safe(v) for v in s[key]]
    if hungarian:
        entry["assignment"] = s["assignment"].tolist()
    return entry, s["assignment"]


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


def _inputs(cfg: Any, args: Mapping[str, Any]) -> dict[str, Request]:
    return {"tokens": Request("extract", cfg, {"split": "val"}), "probes": Request("probe", cfg),
            **projection_request(cfg)}


EVALUATE_PARAMS = Params(
    exclude=(Exclude(("evaluate.crf_pixels",), "evaluate.crf=false: no image goes through the CRF",
                     when=lambda cfg, args: not cfg.evaluate.crf), NO_DIM_WITHOUT_PROVIDER),
    contexts=lambda: (*reader_contexts(), *reader_contexts("evaluate.crf=true")[:2]))


@dataclass
class _Eval:
    """What one evaluation needs, opened and cross-checked."""

    store: TokenStore
    projection: BaseProjection
    probes: Probes
    device: torch.device
    flip: bool
    batch_size: int

    @property
    def size(self) -> tuple[int, int]:
        return self.store.label_hw

    def micro(self) -> int:
        """Samples whose upsampled code and unaries fit in :data:`MICRO_BATCH_BYTES`."""
        h, w = self.size
        per = 4 * h * w * (self.projection.dim + 2 * (self.probes.n_classes + self.probes.n_clusters))
        return max(1, MICRO_BATCH_BYTES // per)

    def predict(self, tokens: np.ndarray, flip: np.ndarray | None, unaries: bool) -> Iterator[dict[str, np.ndarray]]:
        """Predictions (and unaries) of the samples of ``tokens [B, h, w, D]``, in micro-batches."""
        with torch.no_grad():
            t = torch.from_numpy(tokens).to(self.device)
            f = torch.from_numpy(flip).to(self.device) if flip is not None else None
            step = self.micro()
            for a in range(0, t.shape[0], step):
                code = upsampled_codes(self.projection, t[a:a + step], self.size,
                                       f[a:a + step] if f is not None else None)
                out = probes_lib.predict_batch(code, self.probes.linear, self.probes.cluster, unaries=unaries)
                yield {k: v.cpu().numpy() for k, v in out.items()}


def _open(ctx: StageContext, batch_size: int) -> _Eval:
    e, projection_cfg = ctx.config.evaluate, ctx.config.projection
    store = token_store.TokensArtifact(ctx.input("tokens").path).store
    probes = probes_lib.load_probes(ProbesArtifact(ctx.input("probes").path).probes_dir)
    provider = ctx.input("projection").path if "projection" in ctx.inputs else None
    projection = open_projection(provider, store.dim, projection_cfg.get("dim"))
    n_classes = store.attrs.get("n_classes")
    if n_classes is not None and int(n_classes) != probes.n_classes:
        raise InputError(f"token store {store.path} has {n_classes} classes but the probes in "
                         f"{ctx.input('probes').path} were trained for {probes.n_classes}")
    saved = probes.meta.get("projection", {})
    if probes.dim != projection.dim or saved.get("kind", projection.kind) != projection.kind:
        raise ArtifactError(f"probes in {ctx.input('probes').path} read {saved.get('kind')} codes of dim "
                            f"{probes.dim}, but the projection is {projection.kind} of dim {projection.dim}")
    if e.flip_tta and not store.has_flip:
        raise InputError(f"token store {store.path}: evaluate.flip_tta=true needs array 'tokens_flip', "
                         "which this store lacks (extract the val split with flipped tokens)")
    if e.crf and not store.has_rgb:
        raise InputError(f"token store {store.path}: evaluate.crf=true needs array 'rgb', which this store lacks")
    device = torch.device(ctx.device)
    probes.linear.to(device)
    probes.cluster.to(device)
    return _Eval(store, projection, probes, device, bool(e.flip_tta), batch_size)


def _batches(ev: _Eval) -> Iterator[dict[str, np.ndarray]]:
    """The val samples in order, in batches of ``ev.batch_size``: ``index``, float32 ``tokens``, ``labels``
    (and ``tokens_flip`` with flip-TTA); the next batch is read while this one is scored."""
    store = ev.store

    def read(start: int) -> dict[str, np.ndarray]:
        idx = np.arange(start, min(start + ev.batch_size, store.n))
        batch = {"index": idx, "tokens": store.get_tokens(idx), "labels": store.get_labels(idx)}
        if ev.flip:
            batch["tokens_flip"] = store.get_tokens(idx, flip=True)
        return batch

    with prefetch(read, range(0, store.n, ev.batch_size), workers=1, depth=2, name="evaluate-read") as batches:
        yield from batches


def _example_indices(n: int, k: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}) if n and k else []


class _Unaries(Sequence[tuple[np.ndarray, np.ndarray]]):
    """Lazy CRF items for ``samples``: item ``2j + p`` is ``(rgb, unary of probe p)`` of ``samples[j]``
    (p = 0 linear, 1 cluster), computed a batch at a time when first asked for. Also remembers each
    handed-out item's un-refined prediction (the fallback when its CRF fails)."""

    def __init__(self, ev: _Eval, samples: np.ndarray) -> None:
        self.ev, self.samples = ev, samples
        self._batch: tuple[int, list[np.ndarray], list[np.ndarray]] | None = None
        self.fallback: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2 * len(self.samples)

    def __getitem__(self, item: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        j, probe = divmod(item, 2)
        bs = self.ev.batch_size
        start = j - j % bs
        if self._batch is None or self._batch[0] != start:
            idx = self.samples[start:start + bs]
            flip = self.ev.store.get_tokens(idx, flip=True) if self.ev.flip else None
            outs = list(self.ev.predict(self.ev.store.get_tokens(idx), flip, unaries=True))
            self._batch = (start, list(self.ev.store.get_rgb(idx)),
                           [np.concatenate([o[f"{name}_unary"] for o in outs]) for name in PROBE_NAMES])
        _, rgb, unary = self._batch
        u = unary[probe][j - start]
        self.fallback[item] = u.argmax(0).astype(np.int16)
        return rgb[j - start], u


def _crf_keys(n_shards: int) -> list[str]:
    return [f"crf-{k:05d}" for k in range(n_shards)]


def _crf_pass(ctx: StageContext, ev: _Eval, workers: int, timeout_s: float, pixels: str) -> int:
    """Run the CRF over the shards not yet done, each finished shard → ``crf_shards/<key>.npz``;
    returns the number of images refined (both probes) by this call."""
    ranges = ev.store.shard_ranges()
    keys = _crf_keys(len(ranges))
    todo = list(ctx.shards(keys))
    folder = ctx.out / CRF_DIR
    folder.mkdir(exist_ok=True)
    if not todo:
        return 0
    spans = [ranges[keys.index(k)] for k in todo]
    samples = np.concatenate([np.arange(a, b) for a, b in spans])
    owner = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(spans)])
    h, w = ev.size
    buffers: dict[int, dict[str, Any]] = {}
    source = _Unaries(ev, samples)
    ids = ev.store.ids

    def on_result(res: CrfResult) -> None:
        j, probe = divmod(res.index, 2)
        shard = int(owner[j])
        a, b = spans[shard]
        buf = buffers.setdefault(shard, {"preds": np.zeros((2, b - a, h, w), np.int16), "left": 2 * (b - a),
                                         "failed": []})
        fallback = source.fallback.pop(res.index)
        if res.ok:
            pred = res.marginals.argmax(0).astype(np.int16)
        else:
            pred = fallback
            buf["failed"].append({"id": ids[samples[j]], "probe": PROBE_NAMES[probe], "error": str(res.error)})
        buf["preds"][probe, samples[j] - a] = pred
        buf["left"] -= 1
        if buf["left"] == 0:
            _save_shard(folder / f"{todo[shard]}.npz", buf["preds"], buf["failed"])
            ctx.shard_finished(todo[shard])
            del buffers[shard]

    crf_map(source, workers=workers, timeout_s=timeout_s, on_result=on_result, pixels=pixels)
    return len(samples)


def _save_shard(path: Path, preds: np.ndarray, failed: list[dict[str, str]]) -> None:
    """Write one shard's CRF predictions ``[2, k, H, W]`` and failures (whole file or none)."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, preds=preds, failed=np.array(json.dumps(failed)))
    os.replace(tmp, path)


def _read_crf_shards(ev: _Eval, folder: Path) -> Iterator[tuple[int, np.ndarray, list[dict[str, str]]]]:
    for k, (a, _) in enumerate(ev.store.shard_ranges()):
        with np.load(folder / f"crf-{k:05d}.npz") as data:
            yield a, data["preds"], json.loads(str(data["failed"]))


def _index_id(lineage: Mapping[str, str]) -> str | None:
    """The ``prepare`` artifact among the inputs (``lineage``) of the tokens artifact (the val index)."""
    for dep in lineage.values():
        try:
            if stage_of(dep) == "prepare":
                return dep
        except ArtifactError:
            continue
    return None


def _scored_probes(labelled: bool, linear_trained: bool) -> list[str]:
    """The probes whose scores mean something, with one warning for those that are skipped: none without
    a labelled val pixel (a folder dataset without labels), the linear probe only if it was trained."""
    if not labelled:
        log.warning("evaluate: the val split has no labelled pixel (a dataset without labels/val/): no metrics "
                    "are written; `stegopipe predict` writes the cluster maps of your images")
        return []
    if not linear_trained:
        log.warning("evaluate: the linear probe never saw a labelled train pixel (no labels/train/), so it is "
                    "skipped; cluster probe metrics only")
        return ["cluster"]
    return list(PROBE_NAMES)


def _headline(results: Mapping[str, Mapping[str, Any]]) -> str:
    """``linear mIoU 41.2 acc 70.3 | cluster ...`` for the console (scores are ×100)."""
    def number(x: Any) -> str:
        return "n/a" if x is None else f"{x:.1f}"

    parts = [f"{entry.replace('_crf', '+CRF')} mIoU {number(r['miou'])} acc {number(r['accuracy'])}"
             for entry, r in results.items()]
    return " | ".join(parts) or "no labelled val pixels: no metrics"


def _score_pass(ev: _Eval, examples: list[int]) -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]], float]:
    """One pass over the val split: the probes' confusion matrices, the example predictions, the seconds."""
    n, k = ev.probes.n_classes, ev.probes.n_clusters
    shown: dict[int, dict[str, np.ndarray]] = {}
    conf = {"linear": np.zeros((n, n), np.int64), "cluster": np.zeros((k, n), np.int64)}
    start = time.perf_counter()
    for batch in _batches(ev):
        outs = list(ev.predict(batch["tokens"], batch.get("tokens_flip"), unaries=False))
        preds = {name: np.concatenate([o[name] for o in outs]) for name in PROBE_NAMES}
        conf["linear"] += metrics.confusion_matrix(preds["linear"], batch["labels"], n)
        conf["cluster"] += metrics.confusion_matrix(preds["cluster"], batch["labels"], n, k)
        for j, i in enumerate(batch["index"]):
            if int(i) in examples:
                shown[int(i)] = {name: preds[name][j] for name in PROBE_NAMES}
    return conf, shown, time.perf_counter() - start


def _crf_merge(ctx: StageContext, ev: _Eval, conf: dict[str, np.ndarray], shown: dict[int, dict[str, np.ndarray]],
               examples: list[int]) -> tuple[list[dict[str, str]], int, float]:
    """The dense-CRF pass (resumable shards), merged into ``conf`` (``*_crf`` entries) and the examples;
    the shard files are removed afterwards. Returns the failed images, the images refined, the seconds."""
    e, store = ctx.runtime.evaluate, ev.store
    n, k = ev.probes.n_classes, ev.probes.n_clusters
    start = time.perf_counter()
    crf_images = _crf_pass(ctx, ev, int(e.crf_workers), float(e.crf_timeout_s), str(ctx.config.evaluate.crf_pixels))
    crf_s = time.perf_counter() - start
    failed: list[dict[str, str]] = []
    conf["linear_crf"] = np.zeros((n, n), np.int64)
    conf["cluster_crf"] = np.zeros((k, n), np.int64)
    for a, preds, shard_failed in _read_crf_shards(ev, ctx.out / CRF_DIR):
        labels = store.get_labels(np.arange(a, a + preds.shape[1]))
        conf["linear_crf"] += metrics.confusion_matrix(preds[0], labels, n)
        conf["cluster_crf"] += metrics.confusion_matrix(preds[1], labels, n, k)
        failed.extend(shard_failed)
        for i in examples:
            if a <= i < a + preds.shape[1]:
                shown[i].update(linear_crf=preds[0, i - a], cluster_crf=preds[1, i - a])
    for key in _crf_keys(len(store.shard_ranges())):  # a run killed from here on redoes the CRF: files go
        ctx.staging.unmark_shard(key)
    shutil.rmtree(ctx.out / CRF_DIR)
    if store.n and len(failed) == 2 * store.n:
        raise StageError(f"the dense CRF failed on every val image (first error: {failed[0]['error']}); "
                         "check that pydensecrf2 is installed, or run with evaluate.crf=false")
    return failed, crf_images, crf_s


def _write_examples(ctx: StageContext, ev: _Eval, examples: list[int], shown: dict[int, dict[str, np.ndarray]],
                    results: dict[str, Any], assignments: dict[str, np.ndarray]) -> None:
    """One PNG per example image: image, ground truth and every scored prediction, with a legend. Without
    labels (nothing scored): the image and the raw cluster ids (``cluster k``), as ``predict`` shows them."""
    store, attrs = ev.store, ev.store.attrs
    (ctx.out / "examples").mkdir(exist_ok=True)
    rgb = store.get_rgb(examples) if store.has_rgb else None
    labels = store.get_labels(examples) if results else None
    names = ev.probes.meta.get("class_names") or attrs.get("class_names")
    if not results:
        names = [f"cluster {k}" for k in range(ev.probes.n_clusters)]
    backbone = backbone_label(attrs.get("backbone"), attrs.get("weights_tag"))
    caption = (f"{attrs.get('dataset')} {attrs.get('split', 'val')}, {ctx.config.projection.method} "
               f"(dim {ev.projection.dim})" + (f" on {backbone}" if backbone else ""))
    colours = palette(ev.probes.n_classes if results else ev.probes.n_clusters)
    for row, i in enumerate(examples):
        image = rgb[row] if rgb is not None else np.zeros((*store.label_hw, 3), np.uint8)
        preds = {entry: shown[i][entry] for entry in results or ["cluster"]}
        panels, legend = example_panels(image, None if labels is None else labels[row], preds, assignments,
                                        colours, names)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", store.ids[i])
        save_panels(ctx.out / "examples" / f"{row}-{name}.png", panels, legend, title=f"{store.ids[i]}: {caption}")


def _protocol(ctx: StageContext, ev: _Eval) -> dict[str, Any]:
    """What was evaluated and how (``metrics.json``'s ``protocol``): data, inputs, flags, projection."""
    e, projection_cfg, store, attrs = ctx.config.evaluate, ctx.config.projection, ev.store, ev.store.attrs
    tokens_in, probes_in = ctx.input("tokens"), ctx.input("probes")
    return {
        "dataset": attrs.get("dataset"), "split": attrs.get("split", "val"),
        "index_id": _index_id(token_store.TokensArtifact(tokens_in.path).lineage), "tokens_id": tokens_in.id,
        "backbone": attrs.get("backbone"), "weights_tag": attrs.get("weights_tag"),
        "resolution": list(store.label_hw), "feature_grid": list(store.grid),
        "crf": bool(e.crf), "crf_pixels": e.get("crf_pixels"), "flip_tta": bool(e.flip_tta),
        "drop_extra_clusters": bool(e.drop_extra_clusters),
        "probe_id": probes_in.id, "n_classes": ev.probes.n_classes, "n_clusters": ev.probes.n_clusters,
        "seed": int(projection_cfg.seed),
        "projection": {"method": str(projection_cfg.method),
                       "id": ctx.input("projection").id if "projection" in ctx.inputs else None,
                       "kind": ev.projection.kind, "dim": ev.projection.dim,
                       "requested_dim": projection_cfg.get("dim")},
        "class_names": ev.probes.meta.get("class_names"), "n_images": store.n,
    }


@register_stage("evaluate", kind="eval", sections=("evaluate", "projection"), params=EVALUATE_PARAMS, inputs=_inputs, resumable=True,
                make_target="make evaluate")
def evaluate_stage(ctx: StageContext) -> None:
    """Score the linear and cluster probes on the val split (optionally with flip-TTA and dense CRF)."""
    e = ctx.config.evaluate
    ev = _open(ctx, int(ctx.runtime.evaluate.batch_size))
    examples = _example_indices(ev.store.n, int(e.examples))
    conf, shown, eval_s = _score_pass(ev, examples)
    pixels = int(conf["linear"].sum())
    scored = _scored_probes(pixels > 0, ev.probes.linear_trained)
    failed: list[dict[str, str]] = []
    crf_images, crf_s = 0, 0.0
    if e.crf and scored:
        failed, crf_images, crf_s = _crf_merge(ctx, ev, conf, shown, examples)

    results: dict[str, Any] = {}
    assignments: dict[str, np.ndarray] = {}
    for entry, matrix in conf.items():
        np.save(ctx.out / f"confusion_{entry}.npy", matrix)
        if entry.removesuffix("_crf") in scored:
            hungarian = entry.startswith("cluster")
            results[entry], assignments[entry] = _score_entry(matrix, hungarian,
                                                              bool(e.drop_extra_clusters) and hungarian)
    if examples:
        _write_examples(ctx, ev, examples, shown, results, assignments)
    write_json_atomic(ctx.out / EvalArtifact.METRICS, {"protocol": _protocol(ctx, ev), "scores": results})
    throughput = {"eval_pixels_per_s": round(pixels / eval_s, 1) if eval_s > 0 else None}
    if crf_images:
        throughput["crf_images_per_s"] = round(crf_images / crf_s, 3)
    ctx.record(counts={"images": ev.store.n, "pixels": pixels, "crf_failed": len(failed)}, throughput=throughput,
               crf_failed=failed,
               summary={entry: {"miou": r["miou"], "accuracy": r["accuracy"]} for entry, r in results.items()},
               headline=_headline(results))
