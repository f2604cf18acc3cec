"""Why an artifact will be built although its stage has results on this root, and which cached results
were built under other package versions: the reasons ``plan`` and ``status`` show.

A missing task is compared with its nearest cached sibling (same stage on the same root, fewest
differences in code, params and inputs); the reason names what differs: ``code changed:
stages/stego/loss.py (correlation_loss)``, ``params changed: head.lr 0.0005 → 0.001``, ``input changed:
extract-… (tokens)``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.artifacts import ArtifactStore
from pipeline.environment import package_drift
from pipeline.errors import ArtifactError
from pipeline.fingerprint import changed_code
from pipeline.planner import Task
from pipeline.registry import get_stage, stage_fingerprint

MAX_NAMED = 3


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for key in sorted(value):
            yield from _leaves(value[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return ", ".join(items[:MAX_NAMED]) + more


def params_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``key old → new`` for each leaf (dotted path) that differs between two params dicts."""
    old, new = dict(_leaves(before)), dict(_leaves(after))
    return [_change(old, new, key) for key in _changed_keys(old, new)]


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The leaves that differ between two flattened params dicts, sorted."""
    return [key for key in sorted(set(old) | set(new)) if key not in old or key not in new or old[key] != new[key]]


def _change(old: Mapping[str, Any], new: Mapping[str, Any], key: str) -> str:
    def shown(values: Mapping[str, Any]) -> str:
        return _short(values[key]) if key in values else "(unset)"

    return f"{key} {shown(old)} → {shown(new)}"


class Explainer:
    """Reasons for the tasks of one plan against one store (manifests read once, each cached artifact's
    params flattened once, each recorded fingerprint compared with this checkout's once)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.manifests: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.files: dict[str, Mapping[str, Any]] = {}
        self.flat: dict[str, dict[str, Any]] = {}
        self.code_changes: dict[tuple[str, Any], list[str]] = {}

    def current_files(self, stage: str) -> Mapping[str, Any]:
        """The files (hashes and per-name hashes) of ``stage``'s fingerprint in this checkout."""
        if stage not in self.files:
            self.files[stage] = stage_fingerprint(get_stage(stage)).files
        return self.files[stage]

    def siblings(self, stage: str) -> list[tuple[str, dict[str, Any]]]:
        """The readable published artifacts of ``stage`` with their manifests."""
        if stage not in self.manifests:
            found = []
            for artifact in self.store.ids(stage):
                try:
                    found.append((artifact, self.store.manifest(artifact)))
                except ArtifactError:
                    continue
            self.manifests[stage] = found
        return self.manifests[stage]

    def differences(self, task: Task, manifest: Mapping[str, Any], *, flat_task: Mapping[str, Any] | None = None,
                    flat_cached: Mapping[str, Any] | None = None) -> list[str]:
        """What differs between ``task`` and a cached artifact's manifest, most telling first (``flat_*``:
        their params already flattened)."""
        reasons = []
        code = manifest.get("version")
        if not isinstance(code, Mapping):
            reasons.append(f"code changed: built before code fingerprints (version {code})")
        else:
            if code.get("fingerprint") != task.code.get("fingerprint"):
                files = self._code_changes(task.stage, manifest)
                reasons.append(f"code changed: {_listed(files) if files else 'the fingerprint rules'}")
            if code.get("format") != task.code.get("format"):
                reasons.append(f"format version changed: {code.get('format')} → {task.code.get('format')}")
            if code.get("packages") != task.code.get("packages"):
                drift = params_changes(code.get("packages") or {}, task.code.get("packages") or {})
                reasons.append(f"packages changed: {_listed(drift)}")
        old = dict(_leaves(manifest.get("params") or {})) if flat_cached is None else flat_cached
        new = dict(_leaves(task.params)) if flat_task is None else flat_task
        changed = _changed_keys(old, new)
        if changed:  # only the named ones are formatted
            named = [_change(old, new, key) for key in changed[:MAX_NAMED]]
            reasons.append(f"params changed: {_listed(named + changed[MAX_NAMED:])}")
        inputs = manifest.get("inputs") or {}
        moved = [f"{dep} ({name})" for name, dep in sorted(task.inputs.items()) if inputs.get(name) != dep]
        moved += [f"{name} (removed)" for name in sorted(set(inputs) - set(task.inputs))]
        if moved:
            reasons.append(f"input changed: {_listed(moved)}")
        return reasons

    def _flat(self, artifact: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        if artifact not in self.flat:
            self.flat[artifact] = dict(_leaves(manifest.get("params") or {}))
        return self.flat[artifact]

    def _code_changes(self, stage: str, manifest: Mapping[str, Any]) -> list[str]:
        """The files (and names) that differ between a manifest's recorded fingerprint and this checkout's."""
        key = (stage, (manifest.get("fingerprint") or {}).get("digest"))
        if key[1] is None or key not in self.code_changes:
            changed = changed_code((manifest.get("fingerprint") or {}).get("files") or {}, self.current_files(stage))
            if key[1] is None:
                return changed
            self.code_changes[key] = changed
        return self.code_changes[key]

    def why(self, task: Task) -> str | None:
        """Why ``task`` (missing here) is built although its stage has cached artifacts: the differences
        to the nearest of them; None when the stage has none on this root."""
        flat = dict(_leaves(task.params))
        found = [self.differences(task, manifest, flat_task=flat, flat_cached=self._flat(artifact, manifest))
                 for artifact, manifest in self.siblings(task.stage)]
        if not found:
            return None
        # fewest differences; at a tie, one of code alone (what `stegopipe adopt` can carry forward)
        best = min(found, key=lambda reasons: (len(reasons), not reasons or not reasons[0].startswith("code changed")))
        return "; ".join(best) or None

    def drift(self, artifact: str) -> str | None:
        """For a cached artifact built under other versions of the numerics packages: which, else None."""
        try:
            recorded = self.store.manifest(artifact).get("packages") or {}
        except ArtifactError:
            return None
        changed = package_drift(recorded)
        return f"built under other package versions: {_listed(changed)}" if changed else None
