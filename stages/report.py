"""``report`` stage: the artifacts of an experiment → markdown tables, CSV and figures.

The report receives every target artifact of an experiment as an input (``collect: report`` in the
experiment file). From ``eval`` artifacts it builds one row per (evaluation, probe, CRF on/off) with
the protocol flags and lineage, a Table-2-shaped markdown table (the paper's own numbers beside ours,
labelled), Figure-4-shaped PNGs (metric vs dim, log scale, one panel per dataset and probe, mean ± std
over seeds, CRF points as triangles); from PCA ``reducer`` artifacts Figure-3-shaped cumulative
explained-variance curves. Files: ``report.md``, ``metrics.csv``, ``lineage.json``, ``fig3.png``,
``fig4_miou.png``, ``fig4_accuracy.png`` (each figure only when there is data for it).
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import register_section
from pipeline.errors import InputError
from pipeline.runner import StageContext, register_stage

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
PAPER_DATASETS = ("cocostuff27", "cityscapes", "potsdam")
METHOD_LABELS = {"stego": "STEGO", "identity": "DINO", "pca": "PCA", "rp": "RP", "hnne": "h-NNE"}
METHOD_COLOURS = {"stego": "tab:red", "pca": "tab:blue", "rp": "tab:green", "hnne": "tab:purple"}
CSV_COLUMNS = ("dataset", "method", "dim", "seed", "probe", "crf", "flip_tta", "miou", "accuracy", "resolution",
               "n_images", "eval_id", "probe_id", "projection_id", "tokens_id")


@dataclass
class ReportConfig:
    """Where reports are copied (``report.*``; runtime only)."""

    out_dir: str = "reports"


register_section("report", ReportConfig)


def _report_params(cfg: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    return {"experiment": args["experiment"]}


def eval_rows(eval_id: str, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per probe × CRF setting of an ``eval`` artifact's metrics.json."""
    protocol = metrics["protocol"]
    projection = protocol["projection"]
    rows = []
    for key, score in metrics["scores"].items():
        probe, _, crf = key.partition("_")
        rows.append({
            "dataset": protocol["dataset"], "method": projection["method"], "dim": projection.get("dim"),
            "seed": protocol.get("seed"), "probe": probe, "crf": crf == "crf", "flip_tta": protocol.get("flip_tta"),
            "miou": score["miou"], "accuracy": score["accuracy"],
            "resolution": "x".join(map(str, protocol.get("resolution", []))), "n_images": protocol.get("n_images"),
            "eval_id": eval_id, "probe_id": protocol.get("probe_id"), "projection_id": projection.get("id"),
            "tokens_id": protocol.get("tokens_id"),
        })
    return rows


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=0))


def _fmt(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std else f"{mean:.1f}"


def table2_markdown(rows: list[dict[str, Any]]) -> str:
    """Table 2 shape: cluster/linear × acc/mIoU per dataset, CRF results, paper rows labelled."""
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d not in PAPER_DATASETS, d))
    use_crf = any(r["crf"] for r in rows)
    header = "| method | " + " | ".join(f"{d} cluster Acc | {d} cluster mIoU | {d} linear Acc | {d} linear mIoU"
                                         for d in datasets) + " |"
    lines = [header, "|" + " --- |" * (1 + 4 * len(datasets))]
    for label, values in PAPER_TABLE2.items():
        if any(d in PAPER_DATASETS for d in datasets):
            cells = [("-" if v is None else f"{v:.1f}") for d in datasets for v in values.get(d, (None,) * 4)]
            lines.append(f"| {label} *(paper)* | " + " | ".join(cells) + " |")
    for method in ("stego", "identity"):
        chosen = [r for r in rows if r["method"] == method and r["crf"] == use_crf]
        if not chosen:
            continue
        cells = []
        for dataset in datasets:
            for probe in ("cluster", "linear"):
                sel = [r for r in chosen if r["dataset"] == dataset and r["probe"] == probe]
                cells += [_fmt(*mean_std(r["accuracy"] for r in sel)), _fmt(*mean_std(r["miou"] for r in sel))]
        lines.append(f"| {METHOD_LABELS[method]} (stegopipe{', CRF' if use_crf else ''}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """Every (dataset, method, dim, probe, crf) cell as mean ± std over seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["method"], r["dim"], r["probe"], r["crf"])].append(r)
    lines = ["| dataset | method | dim | probe | CRF | seeds | mIoU | accuracy |", "|" + " --- |" * 8]
    for (dataset, method, dim, probe, crf), sel in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        lines.append(f"| {dataset} | {METHOD_LABELS.get(method, method)} | {dim} | {probe} | {'on' if crf else 'off'} | "
                     f"{len(sel)} | {_fmt(*mean_std(r['miou'] for r in sel))} | "
                     f"{_fmt(*mean_std(r['accuracy'] for r in sel))} |")
    return "\n".join(lines)


def plot_fig4(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Figure 4 shape: ``metric`` vs dim (log2 axis) per dataset (columns) and probe (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    if not datasets:
        return False
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.2 * len(datasets), 6.5), squeeze=False, dpi=110)
    for col, dataset in enumerate(datasets):
        for row_i, probe in enumerate(("linear", "cluster")):
            ax = axes[row_i][col]
            sel = [r for r in rows if r["dataset"] == dataset and r["probe"] == probe]
            for method in sorted({r["method"] for r in sel}):
                colour = "k" if method == "identity" else METHOD_COLOURS.get(method, "tab:gray")
                name = METHOD_LABELS.get(method, method)
                for crf in (False, True):
                    pts = [r for r in sel if r["method"] == method and r["crf"] == crf]
                    dims = sorted({r["dim"] for r in pts})
                    if not dims:
                        continue
                    stats = [mean_std(r[metric] for r in pts if r["dim"] == d) for d in dims]
                    means = np.array([s[0] for s in stats])
                    stds = np.array([s[1] for s in stats])
                    if crf:
                        ax.scatter(dims, means, marker="^", s=45, color=colour, label=f"{name} + CRF", zorder=3)
                    elif method == "identity":
                        ax.axhline(means[0], ls="--", color=colour, lw=1, label=f"{name} (D={dims[0]})")
                    else:
                        ax.plot(dims, means, marker="o", ms=3, color=colour, label=name)
                        ax.fill_between(dims, means - stds, means + stds, alpha=0.15, color=colour)
            ticks = sorted({r["dim"] for r in sel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{dataset} — {probe} probe", fontsize=9)
            ax.set_xlabel("output dimension")
            ax.set_ylabel(f"{'mIoU' if metric == 'miou' else 'accuracy'} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_fig3(curves: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Figure 3 shape: cumulative explained variance vs fraction of components, one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8), dpi=110)
    for dataset, evr in sorted(curves.items()):
        ax.plot(evr["interpolated"]["fraction"], evr["interpolated"]["cumulative"], label=dataset)
    ax.set_xlabel("fraction of components (d / D)")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _tokens_dataset(ctx: StageContext, manifest: Mapping[str, Any]) -> str:
    """Dataset name of a reducer artifact, from its train tokens' store attributes."""
    from stages.extract import TOKENS_STORE
    from stages.store import open_token_store

    tokens = open_token_store(ctx.store.path(manifest["inputs"]["tokens"]) / TOKENS_STORE)
    return str(tokens.attrs.get("dataset", "unknown"))


@register_stage("report", version="1", kind="report", params=_report_params, args={"experiment": "adhoc"},
                make_target="make report EXPERIMENT=<name>")
def report(ctx: StageContext) -> dict[str, Any]:
    """Tables, CSV and figures of an experiment's artifacts."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    lineage: dict[str, Any] = {}
    for name in sorted(ctx.inputs):
        artifact = ctx.input(name)
        stage = artifact.manifest.get("stage")
        lineage[artifact.id] = ctx.store.lineage(artifact.id)
        if stage == "evaluate":
            try:
                metrics = json.loads((artifact.path / "metrics.json").read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"{artifact.path / 'metrics.json'}: unreadable ({exc})") from exc
            rows += eval_rows(artifact.id, metrics)
        elif stage == "reduce" and (artifact.path / "evr.json").is_file():
            curves[_tokens_dataset(ctx, artifact.manifest)] = json.loads((artifact.path / "evr.json").read_text())
    experiment = ctx.params["experiment"]
    with open(ctx.out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in CSV_COLUMNS})
    (ctx.out / "lineage.json").write_text(json.dumps(lineage, indent=1) + "\n")
    parts = [f"# Report: {experiment}", "",
             f"{len(rows)} metric rows from {len({r['eval_id'] for r in rows})} evaluations; "
             f"{len(curves)} PCA explained-variance curves. Numbers marked *(paper)* are copied from "
             "Koenig et al. (CVPRW 2023) Table 2 (with CRF); all other numbers were measured by this run. "
             "Every number's artifacts are in metrics.csv (eval/probe/projection/tokens ids) and lineage.json."]
    if rows:
        parts += ["", "## Table 2 (shape of the paper's table)", "", table2_markdown(rows),
                  "", "## All results (mean ± std over seeds)", "", sweep_markdown(rows)]
        for metric in ("miou", "accuracy"):
            if plot_fig4(rows, metric, ctx.out / f"fig4_{metric}.png"):
                parts += ["", f"![Figure 4 ({metric})](fig4_{metric}.png)"]
    if curves:
        plot_fig3(curves, ctx.out / "fig3.png")
        parts += ["", "## Figure 3: PCA cumulative explained variance", "", "![Figure 3](fig3.png)", "",
                  "| dataset | D | components for 50/80/90/95/99 % |", "| --- | --- | --- |"]
        for dataset, evr in sorted(curves.items()):
            parts.append(f"| {dataset} | {evr['in_dim']} | {evr['components_for_evr']} |")
    (ctx.out / "report.md").write_text("\n".join(parts) + "\n")
    return {"counts": {"rows": len(rows), "evaluations": len({r["eval_id"] for r in rows}), "evr_curves": len(curves)}}
