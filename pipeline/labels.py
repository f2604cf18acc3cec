"""Short human labels of artifacts, from their params and lineage.

A stage declares its label fields with :func:`register_label`: a column name (``dataset``, ``method``,
...) and where its value sits in the stage's params (a dotted path, or a function of the params). An
artifact's label holds its own fields and the *inherited* fields of everything it was built from, so an
evaluation shows the dataset of its index and the backbone of its tokens. A field a stage declares as
``local`` (e.g. a split, a resolution) labels that artifact only. Own values win over inherited ones; two
inputs that disagree on a field leave it out (a report over many methods has no one method).

:class:`Labeller` computes labels from any source of ``(stage, params, inputs)`` by id: a plan's tasks,
the store's manifests, or both. ``pipeline/`` knows no field names; plugins register them.
"""
from __future__ import annotations

import hashlib
import json

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Reader = Callable[[Mapping[str, Any]], Any]
Formatter = Callable[[Any], str]


@dataclass(frozen=True)
class LabelField:
    column: str
    read: Reader
    local: bool  # labels this artifact only (not the artifacts built from it)
    paths: tuple[str, ...]  # the dotted params paths it reads (empty: a function)


LABEL_FIELDS: dict[str, list[LabelField]] = {}
COLUMNS: list[str] = []  # every registered column, in registration order (the order labels show them)
FORMATS: dict[str, Formatter] = {}
CELLS: dict[str, Formatter] = {}
ORDERS: dict[str, list[Any]] = {}
REPLICATES: set[str] = set()  # columns that name a replicate of one configuration (seeds)


def _path_reader(paths: tuple[str, ...]) -> Reader:
    def read(params: Mapping[str, Any]) -> Any:
        for path in paths:  # the first that holds a value
            if params.get(path) is not None:  # a dotted config field (``projection.dim``) as one key
                return params[path]
            node: Any = params
            for part in path.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    break
                node = node[part]
            else:
                if node is not None:
                    return node
        return None

    return read


def register_label(stage: str, fields: Mapping[str, str | tuple[str, ...] | Reader], *,
                   local: Iterable[str] = ()) -> None:
    """Declare ``stage``'s label fields ``{column: where in the params}``: a dotted path (a key of that
    name, or a path through nested params), several paths (the first present wins: artifacts written
    under an older params layout keep their labels) or a function of the params. A value of None means
    "not this artifact's" (an inherited value then shows). ``local`` columns are not inherited."""
    local = set(local)
    LABEL_FIELDS[stage] = []
    for column, how in fields.items():
        paths = (how,) if isinstance(how, str) else how if isinstance(how, tuple) else None
        read = _path_reader(paths) if paths else how
        LABEL_FIELDS[stage].append(LabelField(column, read, column in local, paths or ()))  # type: ignore[arg-type]
    COLUMNS.extend(c for c in fields if c not in COLUMNS)


def register_replicate(column: str) -> None:
    """Declare ``column`` a replicate (e.g. a seed): ``results`` pools rows that differ only in it, and its
    params paths are left out of :meth:`Labeller.fingerprint`."""
    REPLICATES.add(column)


def replicate_columns() -> set[str]:
    return set(REPLICATES)


def register_label_format(column: str, text: Formatter | None = None, *, cell: Formatter | None = None,
                          order: Iterable[Any] = ()) -> None:
    """How a column's value reads in a label's ``text`` (default ``column=value``; an empty string hides
    it) and in a table ``cell`` (default ``str``), and the ``order`` its values sort in (others after)."""
    if text is not None:
        FORMATS[column] = text
    if cell is not None:
        CELLS[column] = cell
    if order:
        ORDERS[column] = list(order)


def format_cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    return CELLS[column](value) if column in CELLS else str(value)


def sort_key(column: str, value: Any) -> tuple[int, Any]:
    """Registered order first, then numbers, then text, then None."""
    if value is None:
        return (3, 0, "")
    order = ORDERS.get(column, [])
    if value in order:
        return (0, order.index(value), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def format_value(column: str, value: Any) -> str:
    if column in FORMATS:
        return FORMATS[column](value)
    return f"{column}={value:g}" if isinstance(value, float) else f"{column}={value}"


Record = tuple[str, Mapping[str, Any], Mapping[str, str]]  # stage, params, inputs (name -> id)
_CONFLICT = object()


class Labeller:
    """Labels of artifacts by id. ``lookup(id)`` gives ``(stage, params, inputs)`` or None (unknown: it
    adds nothing). Results are memoised: build one per listing."""

    def __init__(self, lookup: Callable[[str], Record | None]) -> None:
        self._lookup = lookup
        self._own: dict[str, dict[str, Any]] = {}
        self._inherited: dict[str, dict[str, Any]] = {}
        self._fingerprints: dict[str, str] = {}

    def params(self, artifact: str) -> Mapping[str, Any]:
        record = self._lookup(artifact)
        return record[1] if record else {}

    def fingerprint(self, artifact: str) -> str:
        """16 hex digits naming what ``artifact`` computed apart from its replicates: its stage, params
        without the replicate columns' paths, and its inputs' fingerprints (an unknown id stands for itself)."""
        if artifact not in self._fingerprints:
            record = self._lookup(artifact)
            if record is None:
                self._fingerprints[artifact] = artifact
            else:
                stage, params, inputs = record
                dropped = {p for f in LABEL_FIELDS.get(stage, ()) if f.column in REPLICATES for p in f.paths}
                kept = _without(params, dropped)
                blob = json.dumps([stage, kept, {k: self.fingerprint(v) for k, v in sorted(inputs.items())}],
                                  sort_keys=True, default=str)
                self._fingerprints[artifact] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprints[artifact]

    def _walk(self, artifact: str) -> None:
        if artifact in self._own:
            return
        record = self._lookup(artifact)
        self._own[artifact], self._inherited[artifact] = {}, {}
        if record is None:
            return
        stage, params, inputs = record
        merged: dict[str, Any] = {}
        for dep in inputs.values():
            self._walk(dep)
            for column, value in self._inherited[dep].items():
                held = merged.get(column, value)
                merged[column] = value if held == value else _CONFLICT
        own = {}
        for label_field in LABEL_FIELDS.get(stage, ()):
            value = label_field.read(params)
            if value is not None:
                own[label_field.column] = value
        self._own[artifact] = own
        passed_on = {c: v for c, v in merged.items() if v is not _CONFLICT}
        passed_on.update({f.column: own[f.column] for f in LABEL_FIELDS.get(stage, ())
                          if f.column in own and not f.local})
        self._inherited[artifact] = passed_on

    def fields(self, artifact: str) -> dict[str, Any]:
        """``{column: value}`` in :data:`COLUMNS` order: own fields over inherited ones."""
        self._walk(artifact)
        found = {**self._inherited[artifact], **self._own[artifact]}
        return {c: found[c] for c in COLUMNS if c in found}

    def text(self, artifact: str) -> str:
        """The label as one short line, e.g. ``synthetic ViT-S/8 PCA d=16 seed=1 CRF``."""
        return label_text(self.fields(artifact))


def label_text(fields: Mapping[str, Any]) -> str:
    return " ".join(text for column, value in fields.items() if (text := format_value(column, value)))


def manifest_reader(store: Any) -> Callable[[str], dict[str, Any] | None]:
    """``id -> manifest`` of an :class:`~pipeline.artifacts.ArtifactStore`, each read once (None: missing or
    unreadable; labels and results are best effort, never an error)."""
    cache: dict[str, dict[str, Any] | None] = {}

    def manifest_of(artifact: str) -> dict[str, Any] | None:
        if artifact not in cache:
            try:
                cache[artifact] = store.manifest(artifact)
            except Exception:
                cache[artifact] = None
        return cache[artifact]

    return manifest_of


def store_lookup(store: Any, manifest_of: Callable[[str], dict[str, Any] | None] | None = None
                 ) -> Callable[[str], Record | None]:
    """A lookup over the store's manifests (through ``manifest_of`` when given, to share its reads)."""
    read = manifest_of or manifest_reader(store)

    def lookup(artifact: str) -> Record | None:
        manifest = read(artifact)
        if manifest is None:
            return None
        return manifest.get("stage") or "", manifest.get("params") or {}, manifest.get("inputs") or {}

    return lookup


def chain(*lookups: Callable[[str], Record | None]) -> Callable[[str], Record | None]:
    """The first lookup that knows an id answers."""

    def lookup(artifact: str) -> Record | None:
        for one in lookups:
            found = one(artifact)
            if found is not None:
                return found
        return None

    return lookup


def _without(params: Mapping[str, Any], paths: set[str], prefix: str = "") -> dict[str, Any]:
    return {k: _without(v, paths, f"{prefix}{k}.") if isinstance(v, Mapping) else v
            for k, v in params.items() if f"{prefix}{k}" not in paths}


def leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of nested mappings, in their order (an empty mapping has none)."""
    if isinstance(value, Mapping):
        return [leaf for key, sub in value.items() for leaf in leaves(sub, f"{prefix}{key}.")]
    return [(prefix[:-1], value)]


def distinguishing(labels: Sequence[str], params: Sequence[Mapping[str, Any]]) -> list[str]:
    """For rows whose labels are equal, the params that tell them apart (``key=value`` of the leaves that
    differ within each group of equal labels); empty for a row whose label is unique."""
    groups: dict[str, list[int]] = {}
    for n, label in enumerate(labels):
        groups.setdefault(label, []).append(n)
    out = [""] * len(labels)
    for members in groups.values():
        if len(members) < 2:
            continue
        rows = [dict(leaves(params[n])) for n in members]
        keys = sorted({k for leaf in rows for k in leaf})
        varying = [k for k in keys if len({repr(leaf.get(k)) for leaf in rows}) > 1]
        for n, leaf in zip(members, rows, strict=True):
            out[n] = " ".join(f"{k}={leaf.get(k)}" for k in varying)
    return out
