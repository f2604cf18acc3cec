"""Time estimates of missing artifacts from throughputs measured on this machine (``stegopipe plan``).

A stage's *work* for one artifact is a number computed from its params, the bytes of its inputs and the
bytes of its output (:func:`register_work`; default: the larger of the summed input bytes and the output
bytes, i.e. time linear in the data). Its *rate* (work per second) comes, in this order, from

1. the manifests of this stage's artifacts on the same root (``wall_time_s`` and the sizes of the artifact
   and of its inputs still on the root): the median over them;
2. ``<root>/calibration.json``, written by ``stegopipe calibrate`` (a run of the stages on synthetic data in a
   temporary root, measured the same way).

The estimate is ``work / rate`` seconds, always an estimate (a linear or registered model of cost,
measured under whatever load the machine had then), None when either side is unknown. This module knows
no stage names; stages register their work functions.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactStore
from pipeline.errors import ArtifactError

CALIBRATION_FILE = "calibration.json"

WorkFn = Callable[[Mapping[str, Any], int, "int | None"], "float | None"]
"""``work(params, input_bytes, output_bytes) -> work units`` (None: unknown)."""

WORK: dict[str, WorkFn] = {}
_BYTES: dict[tuple[str, str], int] = {}  # (root, id) -> estimated bytes of a missing artifact seen this process


def register_work(stage: str, work: WorkFn) -> None:
    """Declare how a stage's cost scales (e.g. quadratic in its input for kNN, steps × batch for training)."""
    WORK[stage] = work


def default_work(params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
    """Time linear in the data: the larger of the input and output bytes."""
    return float(max(input_bytes, output_bytes or 0)) or None


def work_of(stage: str, params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
    """The stage's registered work (or :func:`default_work`)."""
    return WORK.get(stage, default_work)(params, input_bytes, output_bytes)


def _artifact_bytes(store: ArtifactStore, artifact: str) -> int | None:
    if store.exists(artifact):
        try:
            return store.size(artifact)
        except ArtifactError:  # a damaged manifest: the artifact is rebuilt (or refused) later, not here
            pass
    return _BYTES.get((str(store.root), artifact))


def input_bytes(store: ArtifactStore, inputs: Mapping[str, str]) -> int:
    """Summed bytes of the inputs: cached sizes, or estimates of missing ones seen earlier in this plan
    (a missing input without a byte estimate, e.g. an index or a kNN table, counts as 0: the inputs that
    decide the cost, token stores, have estimates)."""
    return sum(_artifact_bytes(store, artifact) or 0 for artifact in inputs.values())


@lru_cache(maxsize=64)
def _root_rates(root: str, stage: str) -> float | None:
    """Median work/s of the stage's artifacts on this root (None: none measurable)."""
    store = ArtifactStore(root)
    rates = []
    for artifact in store.ids(stage):
        try:
            manifest = store.manifest(artifact)
        except Exception:  # an unreadable manifest says nothing about speed
            continue
        wall = manifest.get("wall_time_s")
        if not wall or not all(store.exists(a) for a in (manifest.get("inputs") or {}).values()):
            continue  # without its inputs on the root, its work cannot be measured
        work = work_of(stage, manifest.get("params") or {}, input_bytes(store, manifest.get("inputs") or {}),
                       store.size(artifact))
        if work:
            rates.append(work / float(wall))
    return statistics.median(rates) if rates else None


def calibration(root: str | Path) -> dict[str, Any]:
    """The stored calibration of this root (empty when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(root) / CALIBRATION_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("rates"), dict) else {}


def rate(store: ArtifactStore, stage: str) -> tuple[float | None, str | None]:
    """(work units per second, where it comes from: ``"root"`` or ``"calibration"``) of a stage."""
    measured = _root_rates(str(store.root), stage)
    if measured:
        return measured, "root"
    stored = calibration(store.root).get("rates", {}).get(stage)
    return (float(stored), "calibration") if stored else (None, None)


def rates_of(store: ArtifactStore, stages: list[str]) -> dict[str, float]:
    """Rates measured from the manifests on ``store`` (what ``calibrate`` stores), by stage."""
    return {stage: r for stage in stages if (r := _root_rates(str(store.root), stage))}


def estimate_seconds(store: ArtifactStore, stage: str, artifact: str, params: Mapping[str, Any],
                     inputs: Mapping[str, str], output_bytes: int | None) -> tuple[float | None, str | None]:
    """(estimated seconds, basis) of a missing artifact; remembers its byte estimate for later tasks.

    Call in dependency order (as ``plan`` lists tasks) so that missing inputs' estimates are known."""
    if output_bytes is not None:
        _BYTES[(str(store.root), artifact)] = output_bytes
    work = work_of(stage, params, input_bytes(store, inputs), output_bytes)
    per_s, basis = rate(store, stage)
    if not work or not per_s:
        return None, None
    return work / per_s, basis
