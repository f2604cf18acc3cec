"""``report`` stage: the artifacts of an experiment → markdown tables, CSV and figures.

The report receives every target artifact of an experiment as an input (``collect: report`` in the
experiment file). From ``eval`` artifacts it builds one row per (evaluation, probe, CRF on/off) with the
protocol flags and lineage. Rows are aggregated over seeds only: a *cell* is one configuration, i.e.
(dataset, method, dim, probe, CRF, protocol flags) and the lineage fingerprint of
:func:`config_fingerprint` (every parameter of every upstream artifact except the run seed), shown as
mean ± std over its seeds. Outputs:

* a Table-2-shaped markdown table (the paper's numbers beside ours, labelled): STEGO and DINO rows, with
  CRF when any evaluation ran it, at the preset's dim per dataset where that was evaluated
  (``projection.dim`` unset), else one row per dim; a dim column says which;
* a table of every cell, and Figure-4-shaped PNGs (metric vs dim, log axis, one panel per dataset and
  probe: mean line, ±1 std band over seeds, CRF points as triangles, the legend below the panels);
* Figure 3 (PCA cumulative explained variance) from every PCA ``reducer`` artifact in the inputs'
  lineage, so an experiment that targets evaluations gets it too.

Titles and captions name the backbone from the lineage (timm name and weights tag, via
:func:`stages.evaluation.figures.backbone_label`). Files: ``report.md``, ``metrics.csv``, ``lineage.json``,
``fig3.png``, ``fig4_miou.png``, ``fig4_accuracy.png`` (each figure only when there is data for it),
at :data:`stages.evaluation.figures.DPI` dpi.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import register_alias, register_section, setting
from pipeline.artifacts import ArtifactStore, stage_of, write_json_atomic
from pipeline.context import StageContext
from pipeline.labels import Labeller, store_lookup
from pipeline.registry import register_stage
from pipeline.results import register_run_table
from stages.artifacts import EvalArtifact, ReduceArtifact
from stages.evaluation.figures import DPI, backbone_label
from stages.projections.methods import METHODS, methods

# Table 2 of Koenig et al. (CVPRW 2023), validation results with CRF, in %:
# {row: {dataset: (cluster acc, cluster mIoU, linear acc, linear mIoU)}}; None = not reported.
PAPER_TABLE2: dict[str, dict[str, tuple[float | None, ...]]] = {
    "STEGO (theirs)": {"cocostuff27": (56.9, 28.2, 76.1, 41.0), "cityscapes": (73.2, 21.0, None, None),
                       "potsdam": (77.0, None, None, None)},
    "STEGO (paper, re-evaluated)": {"cocostuff27": (56.9, 28.2, 76.1, 41.1), "cityscapes": (73.2, 21.0, 89.6, 28.0),
                                    "potsdam": (77.0, 62.6, 85.9, 74.8)},
    "DINO (theirs)": {"cocostuff27": (30.5, 9.6, 66.8, 29.4), "cityscapes": (None,) * 4, "potsdam": (None,) * 4},
    "DINO (paper, re-trained probes)": {"cocostuff27": (42.4, 13.0, 75.8, 44.4), "cityscapes": (52.6, 15.2, 91.3, 34.9),
                                        "potsdam": (71.3, 54.3, 84.5, 72.8)},
}
# The paper's output dims of those rows (D_STEGO of the Table 1 configs; D_ViT of ViT-B/8, ViT-S/8 for Potsdam).
PAPER_DIMS = {"STEGO": {"cocostuff27": 90, "cityscapes": 100, "potsdam": 70},
              "DINO": {"cocostuff27": 768, "cityscapes": 768, "potsdam": 384}}
PAPER_DATASETS = ("cocostuff27", "cityscapes", "potsdam")
METRIC_NAMES = {"miou": "mIoU", "accuracy": "accuracy"}
RUN_SEED = "projection.seed"  # the run seed: left out of configuration fingerprints, in every stage's params
register_alias("seed", (RUN_SEED,))  # `seed=0,1` on the command line sweeps the run seed
# Protocol flags of an evaluation; the first four describe the dataset's tokens, the rest are choices.
DATA_FLAGS = ("backbone", "weights_tag", "resolution", "n_images")
CHOICE_FLAGS = ("crf_pixels", "flip_tta", "drop_extra_clusters")
FLAG_KEYS = DATA_FLAGS + CHOICE_FLAGS
CELL_KEYS = ("dataset", "method", "dim", "probe", "crf", *FLAG_KEYS, "config")
# evaluate params that do not change a score (examples), or not the scores without CRF (crf, crf_pixels)
EVAL_PRESENTATION_PARAMS = ("evaluate.examples",)
EVAL_CRF_PARAMS = ("evaluate.crf", "evaluate.crf_pixels")
CSV_COLUMNS = ("dataset", "method", "dim", "preset_dim", "seed", "probe", "crf", "crf_pixels", "flip_tta",
               "drop_extra_clusters", "backbone", "weights_tag", "miou", "accuracy", "resolution", "n_images",
               "config", "eval_id", "probe_id", "projection_id", "tokens_id")

@dataclass
class ReportConfig:
    """Where reports are copied (``report.*``; runtime only)."""

    out_dir: str = setting("reports", runtime=True, path=True)


register_section("report", ReportConfig)


def method_labels() -> dict[str, str]:
    """The label of every registered method (:mod:`stages.projections.methods`), in legend order."""
    return {m.name: m.label for m in methods()}


def method_label(name: str, *, table: bool = False) -> str:
    """A method's label (its name when unregistered); in tables, marked when it goes beyond the paper."""
    method = METHODS.get(name)
    if method is None:
        return name
    return method.label + (" (beyond the paper)" if table and not method.paper else "")


def config_fingerprint(manifest_of: Callable[[str], Mapping[str, Any] | None], artifact: str,
                       memo: dict[str, str], ignore: Sequence[str] = ()) -> str:
    """16 hex digits naming what ``artifact`` computed, apart from the run seed: its stage, version and params
    (without the run seed :data:`RUN_SEED`, and without the params in ``ignore``) and its
    inputs' fingerprints. ``manifest_of(id)`` is None for an artifact that is gone (its id stands in).
    Two evaluations with equal fingerprints differ at most in their seeds."""
    key = artifact if not ignore else f"{artifact}|{','.join(ignore)}"
    if key in memo:
        return memo[key]
    manifest = manifest_of(artifact)
    if manifest is None:
        memo[key] = artifact
        return artifact
    stage = manifest.get("stage")
    params = {k: v for k, v in (manifest.get("params") or {}).items()
              if k not in ignore and k != RUN_SEED}
    inputs = {name: config_fingerprint(manifest_of, dep, memo)
              for name, dep in sorted((manifest.get("inputs") or {}).items())}
    blob = json.dumps({"stage": stage, "version": manifest.get("version"), "params": params, "inputs": inputs},
                      sort_keys=True, default=str)
    memo[key] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return memo[key]


def eval_rows(eval_id: str, metrics: Mapping[str, Any], configs: Mapping[bool, str] | None = None,
              weights_tag: str | None = None) -> list[dict[str, Any]]:
    """One row per probe × CRF setting of an ``eval`` artifact's metrics.json. ``configs[crf]``: the
    configuration fingerprint of its scores without (False) and with (True) CRF (default None: rows are
    then told apart by their protocol alone);
    ``weights_tag``: used when the protocol does not record one."""
    protocol = metrics["protocol"]
    projection = protocol["projection"]
    rows = []
    for key, score in metrics["scores"].items():
        probe, _, crf_part = key.partition("_")
        crf = crf_part == "crf"
        rows.append({
            "dataset": protocol["dataset"], "method": projection["method"], "dim": projection.get("dim"),
            "preset_dim": "requested_dim" in projection and projection["requested_dim"] is None,
            "seed": protocol.get("seed"), "probe": probe, "crf": crf,
            "crf_pixels": protocol.get("crf_pixels") if crf else None, "flip_tta": bool(protocol.get("flip_tta")),
            "drop_extra_clusters": bool(protocol.get("drop_extra_clusters")), "backbone": protocol.get("backbone"),
            "weights_tag": protocol.get("weights_tag") or weights_tag, "miou": score["miou"],
            "accuracy": score["accuracy"], "resolution": "x".join(map(str, protocol.get("resolution", []))),
            "n_images": protocol.get("n_images"), "config": (configs or {}).get(crf),
            "plain_config": (configs or {}).get(False),  # the evaluation's, apart from its CRF settings
            "eval_id": eval_id, "probe_id": protocol.get("probe_id"), "projection_id": projection.get("id"),
            "tokens_id": protocol.get("tokens_id"),
        })
    return rows


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and population std of the finite values (NaN, NaN when there are none)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=0))


@dataclass
class Cell:
    """The rows of one configuration (:data:`CELL_KEYS`), one per seed."""

    key: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def seeds(self) -> list[Any]:
        return [r["seed"] for r in self.rows]

    @property
    def preset_dim(self) -> bool:
        return all(r["preset_dim"] for r in self.rows)

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_std(r[metric] for r in self.rows)

    def text(self, metric: str, best: bool = False) -> str:
        """Mean ± std over the seeds; one seed says ``(n=1)`` (not ``± 0.0``); bold (markdown) when ``best``."""
        mean, std = self.stat(metric)
        if math.isnan(mean):
            return "-"
        text = f"{mean:.1f} (n=1)" if len(self.rows) == 1 else f"{mean:.1f} ± {std:.1f}"
        return f"**{text}**" if best else text


def best_cells(items: Sequence[Cell], metric: str, group: Sequence[str]) -> set[int]:
    """``id()`` of the cells with the highest mean ``metric`` among those that agree on ``group`` (groups of
    one cell have no best)."""
    groups: dict[tuple[Any, ...], list[Cell]] = defaultdict(list)
    for c in items:
        groups[tuple(c.key[k] for k in group)].append(c)
    best = set()
    for members in groups.values():
        means = [c.stat(metric)[0] for c in members]
        finite = [m for m in means if not math.isnan(m)]
        if len(finite) > 1:
            best |= {id(c) for c, m in zip(members, means, strict=True) if m == max(finite)}
    return best


def cells(rows: Iterable[dict[str, Any]]) -> list[Cell]:
    """Rows grouped by configuration (:data:`CELL_KEYS`): each cell aggregates seeds only. A seed seen twice
    in one configuration is the same computation (e.g. the plain scores of a CRF and a no-CRF evaluation)
    and counts once."""
    groups: dict[tuple[Any, ...], dict[Any, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        groups[tuple(r[k] for k in CELL_KEYS)].setdefault(r["seed"], r)
    out = [Cell(dict(zip(CELL_KEYS, key, strict=True)), list(by_seed.values())) for key, by_seed in groups.items()]
    return sorted(out, key=_cell_order)


FEW_SEEDS = 3  # Figure 4 draws each seed as a dot up to this many seeds per configuration, else a ± std band
PAPER_ORDER = ("identity", "pca", "rp", "hnne", "stego")  # the paper's rows: DINO, PCA, RP, h-NNE, STEGO


def _cell_order(c: Cell) -> tuple[Any, ...]:
    """Dataset, then the paper's method order (other methods after, by name), then the other keys."""
    method = c.key["method"]
    rank = PAPER_ORDER.index(method) if method in PAPER_ORDER else len(PAPER_ORDER)
    return (_order([c.key["dataset"]]), rank, _order(c.key[k] for k in CELL_KEYS if k != "dataset"))


def _order(values: Iterable[Any]) -> tuple[tuple[int, Any], ...]:
    """Sort key: numbers numerically, then strings, then None."""
    return tuple((0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else
                 (2, "") if v is None else (1, str(v)) for v in values)


def _varying(items: Sequence[Cell], keys: Iterable[str]) -> list[str]:
    """The keys with more than one value among ``items`` (``crf_pixels``: among the CRF cells)."""
    return [k for k in keys if len({c.key[k] for c in items if k != "crf_pixels" or c.key["crf"]}) > 1]


def _ambiguous(items: Sequence[Cell], keys: Sequence[str]) -> bool:
    """Whether two cells agree on ``keys`` (so only their configuration fingerprint tells them apart)."""
    return len({tuple(c.key[k] for k in keys) for c in items}) < len(items)


def _flag_text(key: str, value: Any) -> str | None:
    if value is None:
        return None
    return {"flip_tta": "flip-TTA" if value else "no flip-TTA",
            "drop_extra_clusters": "extra clusters dropped" if value else "extra clusters kept",
            "crf_pixels": f"CRF on {value} pixels", "resolution": f"{value} px", "n_images": f"{value} images",
            "config": f"config {str(value)[:8]}"}.get(key, str(value))


def _datasets(items: Iterable[Cell]) -> list[str]:
    return sorted({c.key["dataset"] for c in items}, key=lambda d: (d not in PAPER_DATASETS, d))


def _dims_text(dims: Sequence[Any]) -> str:
    shown = ["-" if d is None else str(d) for d in dims]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def table2_markdown(rows: list[dict[str, Any]], *, every_method: bool = False) -> str:
    """Table 2 shape: cluster/linear × acc/mIoU per dataset, paper rows labelled; our STEGO and DINO rows
    (and those of methods beyond the paper, e.g. UMAP, marked so) with CRF when any evaluation ran it.
    Every cell is one configuration's mean ± std over seeds: the preset's dim where it was evaluated, else
    one row per dim; rows split by the protocol choices that vary (flip-TTA, CRF pixels, extra clusters)
    and, where still ambiguous, by configuration. The best of our rows per column is bold.

    ``every_method``: the table a run ends with: no paper rows, every method in the paper's row order
    (DINO, PCA, RP, h-NNE, STEGO, then the others), and both the scores without and with CRF."""
    all_cells = cells(rows)
    datasets = _datasets(all_cells)
    use_crf = any(c.key["crf"] for c in all_cells)
    crf_modes = (False, True) if every_method and use_crf else (use_crf,)
    beyond = [m.name for m in methods() if not m.paper and any(c.key["method"] == m.name for c in all_cells)]
    shown = sorted({c.key["method"] for c in all_cells}, key=lambda m: (PAPER_ORDER.index(m) if m in PAPER_ORDER
                                                                       else len(PAPER_ORDER), m)) \
        if every_method else ["stego", "identity", *beyond]
    probes = [f"{probe}{'+CRF' if crf and every_method else ''}" for crf in crf_modes for probe in ("cluster", "linear")]
    header = "| method | dim | " + " | ".join(f"{d} {probe} Acc | {d} {probe} mIoU" for d in datasets
                                                for probe in probes) + " |"
    lines = [header, "|" + " --- |" * (2 + 2 * len(probes) * len(datasets))]
    for label, values in PAPER_TABLE2.items() if not every_method else ():
        if any(d in PAPER_DATASETS for d in datasets):
            dims = PAPER_DIMS[label.split(" ", 1)[0]]
            cells_text = [("-" if v is None else f"{v:.1f}") for d in datasets for v in values.get(d, (None,) * 4)]
            lines.append(f"| {label} *(paper)* | {_dims_text([dims.get(d) for d in datasets])} | "
                         + " | ".join(cells_text) + " |")
    chosen_all = [c for c in all_cells if c.key["method"] in shown and c.key["crf"] in crf_modes]
    choices = _varying(chosen_all, CHOICE_FLAGS)
    best = {m: best_cells(chosen_all, m, ("dataset", "probe", "crf")) for m in ("miou", "accuracy")}
    for method in shown:
        chosen = [c for c in chosen_all if c.key["method"] == method]
        with_preset = {c.key["dataset"] for c in chosen if c.preset_dim}
        chosen = [c for c in chosen if c.preset_dim or c.key["dataset"] not in with_preset]
        several = any(len({c.key["dim"] for c in chosen if c.key["dataset"] == d}) > 1 for d in datasets)

        def line_key(c: Cell, several: bool = several) -> tuple[Any, ...]:
            return ((c.key["dim"],) if several else ()) + tuple(c.key[k] for k in choices)

        per_slot = Counter((line_key(c), c.key["dataset"], c.key["crf"], c.key["probe"]) for c in chosen)
        lines_of: dict[tuple[Any, ...], dict[tuple[str, bool, str], Cell]] = defaultdict(dict)
        for c in chosen:
            key = line_key(c)
            if per_slot[(key, c.key["dataset"], c.key["crf"], c.key["probe"])] > 1:  # one line: with and without CRF
                key += (("config", c.rows[0]["plain_config"] if len(crf_modes) > 1 else c.key["config"]),)
            lines_of[key][(c.key["dataset"], c.key["crf"], c.key["probe"])] = c
        for key, slots in sorted(lines_of.items(), key=lambda kv: _order(kv[0])):
            some = next(iter(slots.values()))
            notes = [_flag_text(k, some.key[k]) for k in choices]
            if key and isinstance(key[-1], tuple):  # split by configuration
                notes.append(_flag_text("config", key[-1][1]))
            notes = [n for n in notes if n]
            if every_method:
                label = method_label(method, table=True) + (f" ({', '.join(notes)})" if notes else "")
            else:
                label = f"{method_label(method, table=True)} (stegopipe{', CRF' if use_crf else ''}{''.join(', ' + n for n in notes)})"
            dims = [next((c.key["dim"] for (d, _, _), c in slots.items() if d == dataset), None) for dataset in datasets]
            cells_text = []
            for dataset in datasets:
                for crf in crf_modes:
                    for probe in ("cluster", "linear"):
                        c = slots.get((dataset, crf, probe))
                        cells_text += [c.text("accuracy", id(c) in best["accuracy"]),
                                       c.text("miou", id(c) in best["miou"])] if c else ["-", "-"]
            lines.append(f"| {label} | {_dims_text(dims)} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """Every configuration as mean ± std over its seeds; protocol flags get a column when they vary, the
    configuration fingerprint when two cells differ in nothing else."""
    all_cells = cells(rows)
    readable = [k for k in CELL_KEYS if k != "config"]
    extra = _varying(all_cells, FLAG_KEYS) + (["config"] if _ambiguous(all_cells, readable) else [])
    names = {"backbone": "backbone", "weights_tag": "weights", "resolution": "resolution", "n_images": "images",
             "crf_pixels": "CRF pixels", "flip_tta": "flip-TTA", "drop_extra_clusters": "drop extra",
             "config": "config"}
    header = ["dataset", "method", "dim", "probe", "CRF", *(names[k] for k in extra), "seeds", "mIoU", "accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    best = {m: best_cells(all_cells, m, ("dataset", "probe", "crf")) for m in ("miou", "accuracy")}
    for c in all_cells:
        k = c.key
        values = [k["dataset"], method_label(k["method"], table=True), k["dim"], k["probe"],
                  "on" if k["crf"] else "off", *(str(k[x])[:8] if x == "config" else k[x] for x in extra),
                  ", ".join(map(str, c.seeds)), c.text("miou", id(c) in best["miou"]),
                  c.text("accuracy", id(c) in best["accuracy"])]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines)


def _series(panel: Sequence[Cell], choices: Sequence[str]) -> dict[tuple[Any, ...], list[Cell]]:
    """A panel's cells as plotted series: one per (method, CRF, varying protocol choices, the panel's data
    flags), split by configuration where two cells of a series share a dim."""
    series: dict[tuple[Any, ...], list[Cell]] = defaultdict(list)
    for c in panel:
        series[(c.key["method"], c.key["crf"], *(c.key[k] for k in choices), *(c.key[k] for k in DATA_FLAGS))].append(c)
    out: dict[tuple[Any, ...], list[Cell]] = {}
    for key, members in series.items():
        if len({c.key["dim"] for c in members}) < len(members):
            for c in members:
                out.setdefault(key + (("config", c.key["config"]),), []).append(c)
        else:
            out[key] = members
    return out


def plot_fig4(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Figure 4 shape: ``metric`` vs dim (log2 axis) per dataset (columns) and probe (rows); every point a
    configuration's mean over seeds, the band ±1 std over seeds, CRF points as triangles, the DINO
    baseline (no CRF) as a dashed line at its mean; legend below the panels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    all_cells = cells(rows)
    datasets = _datasets(all_cells)
    if not datasets:
        return False
    choices = _varying(all_cells, CHOICE_FLAGS)
    styles = ["-", "--", ":", "-."]
    variants = sorted({tuple(c.key[k] for k in choices) for c in all_cells}, key=str)
    width = max(6.4, 4.8 * len(datasets))
    fig = Figure(figsize=(width, 7.6), layout="constrained")
    axes = fig.subplots(2, len(datasets), squeeze=False)
    handles: dict[str, Any] = {}
    backbones = {d: _backbone_of([c for c in all_cells if c.key["dataset"] == d]) for d in datasets}
    for col, dataset in enumerate(datasets):
        for row_i, probe in enumerate(("linear", "cluster")):
            ax = axes[row_i][col]
            panel = [c for c in all_cells if c.key["dataset"] == dataset and c.key["probe"] == probe]
            for key, members in sorted(_series(panel, choices).items(), key=lambda kv: _order(kv[0])):
                method, crf = key[0], key[1]
                variant = tuple(key[2:2 + len(choices)])
                colour = METHODS[method].colour if method in METHODS else "tab:gray"
                style = styles[variants.index(variant) % len(styles)]
                notes = [_flag_text(k, v) for k, v in zip(choices, variant, strict=True)]
                if isinstance(key[-1], tuple):
                    notes.append(_flag_text("config", key[-1][1]))
                notes = [n for n in notes if n]
                label = method_label(method) + (" + CRF" if crf else "") + "".join(f", {n}" for n in notes)
                members = sorted(members, key=lambda c: c.key["dim"])
                dims = [c.key["dim"] for c in members]
                stats = np.array([c.stat(metric) for c in members])
                if crf:  # dodged: each method's triangles a little apart, so none hides another
                    dodge = 2.0 ** (0.06 * (list(METHODS).index(method) - 2) if method in METHODS else 0)
                    ax.scatter([d * dodge for d in dims], stats[:, 0], marker="^", s=55, color=colour,
                               edgecolor="white", zorder=4)
                    handles.setdefault(label, Line2D([], [], marker="^", ls="", ms=8, color=colour))
                elif method == "identity":
                    for c, (mean, std) in zip(members, stats, strict=True):
                        ax.axhline(mean, ls=style if style != "-" else "--", color=colour, lw=1.2)
                        if std > 0:
                            ax.axhspan(mean - std, mean + std, color=colour, alpha=0.08, lw=0)
                    handles.setdefault(f"{label} (D={dims[0]})" if len(dims) == 1 else label,
                                       Line2D([], [], ls=style if style != "-" else "--", color=colour))
                else:
                    ax.plot(dims, stats[:, 0], marker="o", ms=4, ls=style, color=colour, lw=1.5)
                    if max(len(c.rows) for c in members) <= FEW_SEEDS:  # each seed a dot: bands would overlap
                        seed_dims = [c.key["dim"] for c in members for _ in c.rows]
                        ax.scatter(seed_dims, [r[metric] for c in members for r in c.rows], s=10, color=colour,
                                   alpha=0.55, lw=0, zorder=3)
                    else:
                        ax.fill_between(dims, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], alpha=0.18,
                                        color=colour, lw=0)
                    handles.setdefault(label, Line2D([], [], marker="o", ms=4, ls=style, color=colour))
            ticks = sorted({c.key["dim"] for c in panel if c.key["dim"] is not None})
            ax.set_xscale("log", base=2)
            if ticks:
                ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
                ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
            ax.minorticks_off()
            title = f"{dataset}: {probe} probe"
            if len(set(backbones.values())) > 1:
                title += f"\n{backbones[dataset]}"
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("output dimension d (log scale)", fontsize=9)
            ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    suptitle = f"Validation {METRIC_NAMES[metric]} vs output dimension"
    if len(set(backbones.values())) == 1:
        suptitle += f"\nfeatures: {next(iter(backbones.values()))}"
    fig.suptitle(suptitle, fontsize=11)
    entry_in = 0.5 + 0.075 * max((len(label) for label in handles), default=0)  # marker + text at 9 pt
    order = list(method_labels().values())
    labels = sorted(handles, key=lambda label: (order.index(label.split(" ")[0]) if label.split(" ")[0] in order
                                                else len(order), label))
    fig.legend([handles[label] for label in labels], labels, loc="outside lower center", fontsize=9, frameon=False,
               ncol=max(1, min(len(handles), int(width // entry_in))))
    fig.savefig(path, dpi=DPI)
    return True


def _backbone_of(items: Iterable[Cell]) -> str:
    names = sorted({backbone_label(c.key["backbone"], c.key["weights_tag"]) or "backbone not recorded" for c in items})
    return "; ".join(names)


def plot_fig3(curves: Mapping[tuple[str, str], Mapping[str, Any]], path: Path) -> None:
    """Figure 3 shape: cumulative explained variance (%) vs fraction of components (log scale, as the
    report's table reads it: a few % of the components hold most of the variance), one line per (dataset,
    backbone) fit; the backbone (from the lineage) in the title, or in the legend when several."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.subplots()
    backbones = {b for _, b in curves}
    smallest = 1.0
    for (dataset, backbone), evr in sorted(curves.items()):
        label = dataset if len(backbones) == 1 else f"{dataset} ({backbone})"
        fraction = np.asarray(evr["fraction"], dtype=float)  # the exact curve: k / D for k components
        shown = fraction > 0  # a log axis starts at the first component
        ax.plot(fraction[shown], 100 * np.asarray(evr["cumulative"], dtype=float)[shown], lw=1.8,
                label=f"{label}, D={evr['in_dim']}")
        smallest = min(smallest, 1.0 / evr["in_dim"])
    ax.set_xscale("log")
    ax.set_xlabel("fraction of principal components d / D (log scale)")
    ax.set_ylabel("cumulative explained variance (%)")
    ax.set_xlim(smallest, 1)
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    title = "PCA of the train tokens: cumulative explained variance"
    if len(backbones) == 1:
        title += f"\n{next(iter(backbones))}"
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=DPI)


def _labelled(node: dict[str, Any], labels: Labeller) -> dict[str, Any]:
    """A lineage node (``{id, stage, inputs}``) and its inputs' nodes, each with its label (pipeline.labels)."""
    return {"id": node["id"], "label": labels.text(node["id"]), **{k: v for k, v in node.items() if k not in ("id", "inputs")},
            "inputs": {name: _labelled(sub, labels) for name, sub in (node.get("inputs") or {}).items()}}


def _tokens_info(ctx: StageContext, tokens_id: str) -> tuple[str, str | None]:
    """(dataset, backbone label) of a tokens artifact: the store's attributes and the manifest's params."""
    from stages.store import TokensArtifact

    artifact = TokensArtifact(ctx.store.path(tokens_id))
    params, tokens = artifact.params, artifact.store
    name = backbone_label(params.get("backbone.name") or tokens.attrs.get("backbone"),
                          params.get("weights_tag") or tokens.attrs.get("weights_tag"))
    return str(tokens.attrs.get("dataset", "unknown")), name


FIG4_CAPTION = (
    "Validation {metric} (%) against the output dimension d (log scale), one column per dataset, linear "
    "probe above and cluster probe below. Each point is one configuration; lines join the mean over its "
    "seeds; with at most 3 seeds each seed is a small dot, with more the shaded band spans ± 1 standard "
    "deviation over the seeds (population std). ▲: the same with dense CRF (mean over seeds). Dashed horizontal line: the DINO "
    "baseline (identity projection at the backbone's full dim D, no CRF), lightly shaded ± 1 std. Triangles "
    "are shifted slightly left or right per method so that none hides another. "
    "Features: {backbone}.")


def metric_rows(store: ArtifactStore, artifacts: Iterable[str]) -> list[dict[str, Any]]:
    """The rows (:func:`eval_rows`) of the published evaluations among ``artifacts``, with the configuration
    fingerprints of their scores without and with CRF."""
    memo: dict[str, str] = {}

    def manifest_of(artifact: str) -> Mapping[str, Any] | None:
        return store.manifest(artifact) if store.exists(artifact) else None

    rows: list[dict[str, Any]] = []
    for artifact in artifacts:
        if stage_of(artifact) != "evaluate" or not store.exists(artifact):
            continue
        metrics = EvalArtifact(store.path(artifact)).metrics
        plain = (*EVAL_PRESENTATION_PARAMS, *EVAL_CRF_PARAMS)
        configs = {False: config_fingerprint(manifest_of, artifact, memo, ignore=plain),
                   True: config_fingerprint(manifest_of, artifact, memo, ignore=EVAL_PRESENTATION_PARAMS)}
        tokens_id = metrics.get("protocol", {}).get("tokens_id")
        tokens = manifest_of(tokens_id) if tokens_id else None
        rows += eval_rows(artifact, metrics, configs, ((tokens or {}).get("params") or {}).get("weights_tag"))
    return rows


def run_table(store: ArtifactStore, artifacts: Sequence[str]) -> str | None:
    """What a run of an experiment ends with: the Table 2 shape of its evaluations
    (:func:`table2_markdown` with ``every_method``), columns aligned; None without evaluations."""
    rows = metric_rows(store, artifacts)
    if not rows:
        return None
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in table2_markdown(rows, every_method=True).splitlines()]
    widths = [max(len(line[i]) for line in table if i < len(line)) for i in range(len(table[0]))]
    table[1] = ["-" * w for w in widths]
    return "\n".join("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     + " |" for line in table)


register_run_table(run_table)


@register_stage("report", kind="report", sections=("report",), args={"experiment": "adhoc"},
                make_target="make report EXPERIMENT=<name>")
def report(ctx: StageContext) -> None:
    """Tables, CSV and figures of an experiment's artifacts."""
    rows = metric_rows(ctx.store, [ctx.input(name).id for name in sorted(ctx.inputs)])
    lineage = {ctx.input(name).id: ctx.store.lineage(ctx.input(name).id) for name in sorted(ctx.inputs)}
    curves: dict[tuple[str, str], Any] = {}
    for artifact in sorted(ctx.store.closure({a.id for a in ctx.inputs.values()})):  # PCA fits in the lineage
        if stage_of(artifact) != "reduce":
            continue
        fit = ReduceArtifact.of(ctx.store, artifact)
        evr = fit.evr
        if evr is not None:
            dataset, backbone = _tokens_info(ctx, fit.input_id("tokens"))
            curves[(dataset, backbone or "backbone not recorded")] = evr
    experiment = ctx.params["experiment"]
    with open(ctx.out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in CSV_COLUMNS})
    labels = Labeller(store_lookup(ctx.store))
    write_json_atomic(ctx.out / "lineage.json", {a: _labelled(node, labels) for a, node in lineage.items()})
    n_cells = len(cells(rows))
    parts = [f"# Report: {experiment}", "",
             f"{len(rows)} metric rows from {len({r['eval_id'] for r in rows})} evaluations in {n_cells} "
             f"configurations; {len(curves)} PCA explained-variance curve(s). Numbers marked *(paper)* are "
             "copied from Koenig et al. (CVPRW 2023) Table 2 (with CRF); all other numbers were measured by "
             "this run. Every cell is the mean ± std (population) over the seeds of one configuration: the "
             "same dataset, method, dim, probe, CRF setting, protocol flags and upstream parameters, so "
             "different experiments are never pooled. Every number's artifacts are in metrics.csv "
             "(eval/probe/projection/tokens ids, configuration fingerprint) and lineage.json."]
    if rows:
        parts += ["", "## Table 2 (shape of the paper's table)", "",
                  "The dim column gives the output dim per dataset (the preset's D_STEGO where it was evaluated, "
                  "as in the paper; one row per dim otherwise).", "", table2_markdown(rows),
                  "", "## All results (mean ± std over seeds)", "", sweep_markdown(rows)]
        backbone = _backbone_of(cells(rows))
        for number, metric in enumerate(("miou", "accuracy")):
            if plot_fig4(rows, metric, ctx.out / f"fig4_{metric}.png"):
                parts += ["", f"## Figure 4{'ab'[number]} (shape): {METRIC_NAMES[metric]} vs output dimension", "",
                          f"![Figure 4: {METRIC_NAMES[metric]} vs dim](fig4_{metric}.png)", "",
                          "*" + FIG4_CAPTION.format(metric=METRIC_NAMES[metric], backbone=backbone) + "*"]
    if curves:
        plot_fig3(curves, ctx.out / "fig3.png")
        backbones = "; ".join(sorted({b for _, b in curves}))
        parts += ["", "## Figure 3 (shape): PCA cumulative explained variance", "", "![Figure 3](fig3.png)", "",
                  "*Cumulative explained variance of the principal components of the train tokens against the "
                  f"fraction d / D of components kept (exact PCA fit in the lineage). Features: {backbones}.*", "",
                  "| dataset | features | D | components for 50/80/90/95/99 % |", "| --- | --- | --- | --- |"]
        for (dataset, backbone_name), evr in sorted(curves.items()):
            counts = " / ".join(str(evr["components_for_evr"].get(f"{t:g}", "-")) for t in (0.5, 0.8, 0.9, 0.95, 0.99))
            parts.append(f"| {dataset} | {backbone_name} | {evr['in_dim']} | {counts} |")
    (ctx.out / "report.md").write_text("\n".join(parts) + "\n")
    ctx.record(counts={"rows": len(rows), "evaluations": len({r["eval_id"] for r in rows}), "cells": n_cells,
                       "evr_curves": len(curves)})
