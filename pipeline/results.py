"""Results across runs (``stegopipe results``): one row per artifact whose manifest records a
``summary`` (``{entry: {metric: value}}``, e.g. an evaluation's linear/cluster mIoU and accuracy), with its
label columns (:mod:`pipeline.labels`); or one row per configuration, the mean ± std over the replicate
columns (seeds). Reads manifests only (no metrics files, no plugins' heavy code), so it stays fast on a
root with thousands of artifacts.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError, did_you_mean
from pipeline.labels import (COLUMNS, Labeller, distinguishing, format_cell, format_value, label_text,
                             replicate_columns, sort_key)

ENTRY_NAMES: dict[str, str] = {}  # summary entry -> header text, in the order columns show them
METRIC_NAMES: dict[str, str] = {}  # metric -> header text, in order
FORMATS = ("table", "csv", "json", "md")


RunTable = Callable[[Any, Sequence[str]], "str | None"]
_RUN_TABLE: list[RunTable] = []


def register_run_table(table: RunTable) -> None:
    """How a run of an experiment ends: ``table(store, artifact_ids)`` gives the text of its results table
    (None when there is nothing to show); a plugin's, e.g. the report's Table 2 shape."""
    _RUN_TABLE[:] = [table]


def run_table(store: Any, artifacts: Sequence[str]) -> str | None:
    """The registered run table of ``artifacts`` (None when none is registered or it has nothing)."""
    return _RUN_TABLE[0](store, artifacts) if _RUN_TABLE else None


def register_result_names(entries: Mapping[str, str], metrics: Mapping[str, str]) -> None:
    """Header texts (and column order) of summary entries and metrics, e.g. ``{"linear_crf": "linear+CRF"}``
    and ``{"miou": "mIoU"}``; unregistered ones follow, as they are, in sorted order."""
    ENTRY_NAMES.update(entries)
    METRIC_NAMES.update(metrics)


@dataclass
class Row:
    """One artifact, or one configuration over its replicates (``ids``: every artifact pooled)."""

    ids: list[str]
    label: dict[str, Any]
    metrics: dict[str, list[float]] = field(default_factory=dict)  # key -> one value per artifact
    config: str = ""  # what tells rows with equal labels apart: differing params, or a fingerprint

    @property
    def n(self) -> int:
        return len(self.ids)

    def mean_std(self, key: str) -> tuple[float, float]:
        values = [v for v in self.metrics.get(key, []) if v is not None and not math.isnan(v)]
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

    def cell(self, key: str) -> str:
        mean, std = self.mean_std(key)
        if math.isnan(mean):
            return "-"
        return f"{mean:.1f}" if self.n == 1 else f"{mean:.1f} ± {std:.1f}"


def metric_key(entry: str, metric: str) -> str:
    return f"{entry}_{metric}"


def artifact_rows(manifest_of: Callable[[str], Mapping[str, Any] | None], ids: Iterable[str],
                  labeller: Labeller) -> list[Row]:
    """One row per artifact of ``ids`` that is published (``manifest_of`` gives its manifest, None when it
    is gone or unreadable) and records a ``summary``."""
    rows = []
    for artifact in ids:
        manifest = manifest_of(artifact) or {}
        summary = manifest.get("summary")
        if not isinstance(summary, Mapping):
            continue
        metrics = {metric_key(entry, m): [float(v)] for entry, values in summary.items()
                   for m, v in (values or {}).items() if isinstance(v, (int, float))}
        rows.append(Row([artifact], labeller.fields(artifact), metrics))
    return rows


def distinguish(rows: list[Row], labeller: Labeller) -> None:
    """Rows with equal labels get the params that tell them apart in ``config``."""
    texts = [label_text(r.label) for r in rows]
    params = [labeller.params(r.ids[0]) for r in rows]
    for row, text in zip(rows, distinguishing(texts, params), strict=True):
        row.config = text


def aggregate(rows: Sequence[Row], labeller: Labeller) -> list[Row]:
    """Rows pooled over their replicates (seeds): one per configuration, i.e. equal label without the
    replicate columns and equal lineage apart from the replicate params. Two configurations with equal
    labels are told apart by the first 8 hex of their fingerprint in ``config``."""
    replicate = replicate_columns()
    groups: dict[tuple[str, str], Row] = {}
    for row in rows:
        label = {k: v for k, v in row.label.items() if k not in replicate}
        fingerprint = labeller.fingerprint(row.ids[0])
        key = (json.dumps(label, sort_keys=True, default=str), fingerprint)
        if key not in groups:
            groups[key] = Row([], label, {}, fingerprint[:8])
        group = groups[key]
        group.ids += row.ids
        for name, values in row.metrics.items():
            group.metrics.setdefault(name, []).extend(values)
    out = list(groups.values())
    labels = [json.dumps(r.label, sort_keys=True, default=str) for r in out]
    for row, label in zip(out, labels, strict=True):
        if labels.count(label) == 1:
            row.config = ""
    return out


def _matches(row: Row, key: str, wanted: str) -> bool:
    value = row.label.get(key)
    if value is None:
        return wanted.lower() in ("", "none", "-")
    return wanted.lower() in {str(value).lower(), format_value(key, value).lower(), json.dumps(value).lower()}


def where(rows: list[Row], conditions: Sequence[str]) -> list[Row]:
    """Rows whose label has ``key=value`` for every condition (the raw or the displayed value)."""
    for condition in conditions:
        key, sep, wanted = condition.partition("=")
        if not sep:
            raise ConfigError(f"--where {condition!r}: expected key=value, e.g. method=pca")
        if key not in COLUMNS:
            raise ConfigError(f"--where {condition!r}: unknown column '{key}'{did_you_mean(key, COLUMNS)}; "
                              f"columns: {', '.join(COLUMNS)}")
        rows = [r for r in rows if _matches(r, key, wanted)]
    return rows


def metric_columns(rows: Sequence[Row]) -> list[str]:
    """The metric keys present in ``rows``, registered entries and metrics first."""
    present = {k for r in rows for k in r.metrics}
    entries = list(ENTRY_NAMES) + sorted({k.rsplit("_", 1)[0] for k in present} - set(ENTRY_NAMES))
    metrics = list(METRIC_NAMES) + sorted({k.rsplit("_", 1)[1] for k in present} - set(METRIC_NAMES))
    return [metric_key(e, m) for e in entries for m in metrics if metric_key(e, m) in present]


def sort(rows: list[Row], key: str | None) -> list[Row]:
    """By a metric (best first) or a label column; default: label columns in order."""
    if key is None:
        return sorted(rows, key=lambda r: [sort_key(c, r.label.get(c)) for c in COLUMNS])
    metrics = metric_columns(rows)
    if key in metrics:
        return sorted(rows, key=lambda r: -(r.mean_std(key)[0] if not math.isnan(r.mean_std(key)[0]) else -math.inf))
    if key in COLUMNS:
        return sorted(rows, key=lambda r: sort_key(key, r.label.get(key)))
    raise ConfigError(f"--sort {key!r}: not a metric or column here{did_you_mean(key, metrics + COLUMNS)}; "
                      f"metrics: {', '.join(metrics) or '(none)'}")


def _header(key: str) -> str:
    entry, metric = key.rsplit("_", 1)
    return f"{ENTRY_NAMES.get(entry, entry)} {METRIC_NAMES.get(metric, metric)}"


def render(rows: Sequence[Row], fmt: str, *, per_artifact: bool) -> str:
    """``rows`` as an aligned table, CSV, JSON or a markdown table."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    label_cols = [c for c in COLUMNS if any(c in r.label for r in rows)]
    metrics = metric_columns(rows)
    show_config = any(r.config for r in rows)
    if fmt == "json":
        return json.dumps([{"ids": r.ids, "n": r.n, "label": r.label, "config": r.config,
                            "mean": {k: _num(r.mean_std(k)[0]) for k in metrics},
                            "std": {k: _num(r.mean_std(k)[1]) for k in metrics}} for r in rows], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["ids", *label_cols, "config", "n", *(x for k in metrics for x in (k, f"{k}_std"))])
        for r in rows:
            writer.writerow([" ".join(r.ids), *(r.label.get(c, "") for c in label_cols), r.config, r.n,
                             *(x for k in metrics for x in (_num(r.mean_std(k)[0]), _num(r.mean_std(k)[1])))])
        return buffer.getvalue().rstrip("\n")
    header = (["id"] if per_artifact else []) + label_cols + (["config"] if show_config else []) + \
        ([] if per_artifact else ["n"]) + [_header(k) for k in metrics]
    body = [([r.ids[0]] if per_artifact else []) + [format_cell(c, r.label.get(c)) for c in label_cols] +
            ([r.config or "-"] if show_config else []) + ([] if per_artifact else [str(r.n)]) +
            [r.cell(k) for k in metrics] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(x) for x in column) for column in zip(header, *body, strict=True)]
    numeric = [False] * (len(header) - len(metrics)) + [True] * len(metrics)
    return "\n".join("  ".join(x.rjust(w) if num else x.ljust(w) for x, w, num in zip(line, widths, numeric, strict=True)).rstrip()
                     for line in [header, *body])


def _num(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)
