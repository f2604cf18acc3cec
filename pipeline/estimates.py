"""Time estimates of missing artifacts from costs measured on this machine (``stegopipe plan``).

A stage's *work* for one artifact is a number computed from its params, the bytes of its inputs and the
bytes of its output (:func:`register_work`; default: the larger of the summed input bytes and the output
bytes, i.e. time linear in the data). A stage may also split its artifacts into *kinds* that cost
differently (e.g. ``reduce`` by ``projection.method``); each kind has its own model. The model of a
(stage, kind) is ``seconds = startup_s + work / per_s``: a fixed start-up (model set-up, compilation, the
first reads) plus a rate. It comes, in this order, from

1. the manifests of its artifacts on the same root (``wall_time_s`` and the sizes of the artifact and of
   its inputs still on the root): with two or more sizes of work, the least-squares line through the
   (work, wall) points (:func:`fit_cost`); with one size, the rate through that point less the
   calibrated start-up;
2. ``<root>/calibration.json``, written by ``stegopipe calibrate`` (runs of the stages at two sizes on
   synthetic data in a temporary root, fitted the same way).

A stage whose time is a sum of parts that scale differently (kNN: reading the store, linear in its bytes,
then the search, quadratic) registers *phases* (:func:`register_phases`) and records each phase's seconds
in its manifest (``ctx.record(phase_seconds={...})``). Each phase then has its own model (``key:phase``),
fitted on its own (work, seconds) points, and ``key:rest`` models what the phases leave out (start-up,
writing) as a constant; the estimate is their sum. Without phase times (older manifests) or a model for
every phase, the stage's single model applies.

Every estimate is an estimate (a model of cost measured under whatever load the machine had then), None
when the work or the model is unknown. This module knows no stage names; stages register their work.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactStore, manifest_bytes
from pipeline.errors import ArtifactError

CALIBRATION_FILE = "calibration.json"

WorkFn = Callable[[Mapping[str, Any], int, "int | None"], "float | None"]
"""``work(params, input_bytes, output_bytes) -> work units`` (None: unknown)."""
KindFn = Callable[[Mapping[str, Any]], str]
"""``kind(params) -> name``: artifacts of one stage that cost differently (each kind its own model)."""

WORK: dict[str, WorkFn] = {}
KINDS: dict[str, KindFn] = {}
PHASES: dict[str, dict[str, WorkFn]] = {}
PHASE_SECONDS = "phase_seconds"
"""The manifest field (``{phase: seconds}``) a phased stage records."""
REST = "rest"
_BYTES: dict[tuple[str, str], int] = {}  # (root, id) -> estimated bytes of a missing artifact seen this process
_SPREAD = 1.2  # works differing by less than this factor are one size: no line through them


@dataclass(frozen=True)
class CostModel:
    """``seconds = startup_s + work / per_s``; ``per_s`` None: the time does not depend on the work."""

    startup_s: float
    per_s: float | None

    def seconds(self, work: float) -> float:
        return self.startup_s + (work / self.per_s if self.per_s else 0.0)


def register_work(stage: str, work: WorkFn, kind: KindFn | None = None) -> None:
    """Declare how a stage's cost scales (e.g. quadratic in its input for kNN, steps × batch for training)
    and, optionally, which of its artifacts cost alike (``kind``)."""
    WORK[stage] = work
    if kind is not None:
        KINDS[stage] = kind


def register_phases(stage: str, phases: Mapping[str, WorkFn]) -> None:
    """Declare the phases of a stage's time, each with its work (e.g. kNN: ``read`` linear in the input
    bytes, ``search`` quadratic); the stage records ``phase_seconds`` with one entry per phase."""
    if REST in phases:
        raise ValueError(f"phase name {REST!r} is reserved for the time outside the phases")
    PHASES[stage] = dict(phases)


def default_work(params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
    """Time linear in the data: the larger of the input and output bytes."""
    return float(max(input_bytes, output_bytes or 0)) or None


def work_of(stage: str, params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
    """The stage's registered work (or :func:`default_work`)."""
    return WORK.get(stage, default_work)(params, input_bytes, output_bytes)


def model_key(stage: str, params: Mapping[str, Any]) -> str:
    """``stage`` or ``stage/kind``: which model an artifact's time comes from (and feeds)."""
    return f"{stage}/{KINDS[stage](params)}" if stage in KINDS else stage


def fit_cost(points: list[tuple[float, float]], startup_s: float = 0.0) -> CostModel | None:
    """The cost model of (work, wall seconds) points.

    Works spanning at least ``_SPREAD``: the least-squares line; a negative intercept is clipped to 0
    (rate through the origin), a slope at or below 0 means the time does not grow with the work (the mean
    wall). One size of work: the median rate after taking off ``startup_s`` (kept below the fastest wall)."""
    points = [(w, t) for w, t in points if w > 0 and t > 0]
    if not points:
        return None
    works = [w for w, _ in points]
    if len(points) >= 2 and max(works) >= _SPREAD * min(works):
        mean_w, mean_t = statistics.fmean(works), statistics.fmean(t for _, t in points)
        slope = (sum((w - mean_w) * (t - mean_t) for w, t in points)
                 / sum((w - mean_w) ** 2 for w in works))
        if slope <= 0:
            return CostModel(mean_t, None)
        intercept = mean_t - slope * mean_w
        if intercept >= 0:
            return CostModel(intercept, 1.0 / slope)
        return CostModel(0.0, statistics.median(w / t for w, t in points))
    startup = min(startup_s, 0.9 * min(t for _, t in points))
    return CostModel(startup, statistics.median(w / (t - startup) for w, t in points))


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
def _root_points(root: str, stage: str) -> dict[str, list[tuple[float, float]]]:
    """(work, wall) of the stage's artifacts on this root whose inputs are still there, by model key."""
    store = ArtifactStore(root)
    points: dict[str, list[tuple[float, float]]] = {}
    for artifact in store.ids(stage):
        try:
            manifest = store.manifest(artifact)
        except Exception:  # an unreadable manifest says nothing about speed
            continue
        wall, params, inputs = manifest.get("wall_time_s"), manifest.get("params") or {}, manifest.get("inputs") or {}
        if not wall or not all(store.exists(a) for a in inputs.values()):
            continue  # without its inputs on the root, its work cannot be measured
        key, in_bytes, out_bytes = model_key(stage, params), input_bytes(store, inputs), manifest_bytes(manifest)
        work = work_of(stage, params, in_bytes, out_bytes)
        if work:
            points.setdefault(key, []).append((work, float(wall)))
        for phase, (phase_work, seconds) in _phase_points(stage, params, in_bytes, out_bytes, manifest).items():
            points.setdefault(f"{key}:{phase}", []).append((phase_work, seconds))
    return points


def _phase_points(stage: str, params: Mapping[str, Any], in_bytes: int, out_bytes: int | None,
                  manifest: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """{phase: (work, seconds)} of one manifest of a phased stage, ``rest`` included (work 1: a constant);
    empty when the manifest lacks a phase's time or a work is unknown."""
    phases, recorded = PHASES.get(stage), manifest.get(PHASE_SECONDS)
    if not phases or not isinstance(recorded, dict):
        return {}
    out: dict[str, tuple[float, float]] = {}
    for phase, work_fn in phases.items():
        work, seconds = work_fn(params, in_bytes, out_bytes), recorded.get(phase)
        if not work or not isinstance(seconds, (int, float)) or seconds <= 0:
            return {}
        out[phase] = (work, float(seconds))
    rest = float(manifest["wall_time_s"]) - sum(seconds for _, seconds in out.values())
    out[REST] = (1.0, max(rest, 1e-3))
    return out


def calibration(root: str | Path) -> dict[str, Any]:
    """The stored calibration of this root (empty when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(root) / CALIBRATION_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("models"), dict) else {}


def _calibrated(root: str, key: str) -> CostModel | None:
    stored = calibration(root).get("models", {}).get(key)
    try:
        return CostModel(float(stored["startup_s"]), float(stored["per_s"]) if stored["per_s"] else None)
    except (TypeError, KeyError, ValueError):
        return None


def model(store: ArtifactStore, stage: str, params: Mapping[str, Any]) -> tuple[CostModel | None, str | None]:
    """(cost model, where it comes from: ``"root"`` or ``"calibration"``) of an artifact of ``stage``."""
    return _keyed_model(store, stage, model_key(stage, params))


def _keyed_model(store: ArtifactStore, stage: str, key: str) -> tuple[CostModel | None, str | None]:
    stored = _calibrated(str(store.root), key)
    measured = fit_cost(_root_points(str(store.root), stage).get(key, []), stored.startup_s if stored else 0.0)
    if measured:
        return measured, "root"
    return (stored, "calibration") if stored else (None, None)


def models_of(store: ArtifactStore, stages: list[str]) -> dict[str, dict[str, Any]]:
    """Cost models fitted from the manifests on ``store`` (what ``calibrate`` stores), by model key."""
    return {key: asdict(fitted) for stage in stages for key, points in _root_points(str(store.root), stage).items()
            if (fitted := fit_cost(points))}


def estimate_seconds(store: ArtifactStore, stage: str, artifact: str, params: Mapping[str, Any],
                     inputs: Mapping[str, str], output_bytes: int | None) -> tuple[float | None, str | None]:
    """(estimated seconds, basis) of a missing artifact; remembers its byte estimate for later tasks.

    Call in dependency order (as ``plan`` lists tasks) so that missing inputs' estimates are known."""
    if output_bytes is not None:
        _BYTES[(str(store.root), artifact)] = output_bytes
    in_bytes = input_bytes(store, inputs)
    phased = _phased_seconds(store, stage, params, in_bytes, output_bytes)
    if phased is not None:
        return phased
    work = work_of(stage, params, in_bytes, output_bytes)
    fitted, basis = model(store, stage, params)
    if not work or not fitted:
        return None, None
    return fitted.seconds(work), basis


def _phased_seconds(store: ArtifactStore, stage: str, params: Mapping[str, Any], in_bytes: int,
                    output_bytes: int | None) -> tuple[float, str] | None:
    """(the sum of the phase models, basis) of a phased stage; None unless every phase has a work and a
    model. The basis is ``"root"`` only when every phase's model comes from the root."""
    if stage not in PHASES:
        return None
    key = model_key(stage, params)
    works = {phase: fn(params, in_bytes, output_bytes) for phase, fn in PHASES[stage].items()} | {REST: 1.0}
    total, bases = 0.0, set()
    for phase, work in works.items():
        fitted, basis = _keyed_model(store, stage, f"{key}:{phase}")
        if not work or fitted is None:
            return None
        total += fitted.seconds(work)
        bases.add(basis)
    return total, "root" if bases == {"root"} else "calibration"
