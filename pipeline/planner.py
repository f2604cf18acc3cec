"""Planning: requests (a stage under a config, with args) become a deduplicated, topologically sorted
list of :class:`Task` s whose ids are content addresses (:func:`pipeline.artifacts.artifact_id`)."""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import artifact_id
from pipeline.config import get_path, to_container
from pipeline.errors import ConfigError
from pipeline.fingerprint import Fingerprint
from pipeline.params import View
from pipeline.registry import NEEDS, Need, Stage, get_stage, id_params, stage_code, stage_fingerprint


@dataclass(frozen=True)
class Request:
    """Ask for the artifact of ``stage`` under ``cfg`` with request ``args`` (e.g. split=val).

    ``extra_inputs`` adds inputs beyond the stage's own: requests, or ids of tasks already planned.
    """

    stage: str
    cfg: DictConfig | View = field(compare=False, hash=False)  # a View: a plain resolved tree (experiments' cells)
    args: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    extra_inputs: Mapping[str, Request | str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    """One stage run, fully resolved; plain data so it can travel to a Dask worker."""

    stage: str
    id: str
    params: dict[str, Any]
    args: dict[str, Any]
    cfg: dict[str, Any]
    inputs: dict[str, str]
    needs: list[Need] = field(default_factory=list)
    code: dict[str, Any] = field(default_factory=dict)  # the code part of the id (registry.stage_code)
    code_files: dict[str, str] = field(default_factory=dict)  # file → hash the fingerprint covered, here
    label: str = ""  # a short human label (pipeline.labels) for the console; never part of the id
    waits: list[str] = field(default_factory=list)  # a placeholder (id not computable yet): what it waits for


class _Memo:
    """What one ``plan`` call computes once: each config's plain resolved dict (by config object; the
    configs are held so their ids stay theirs), each stage's id params, or its ConfigError, by the
    stage, its sections' values and args (files a params function reads do not change while one plan runs),
    and each stage's code fingerprint."""

    def __init__(self) -> None:
        self.trees: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.params: dict[str, dict[str, Any] | ConfigError] = {}
        self.placeholders = True  # plan tasks whose ids wait for something as placeholders
        self.fingerprints: dict[str, Fingerprint] = {}

    def fingerprint(self, stage: Stage) -> Fingerprint:
        """The code fingerprint of ``stage`` (computed once per plan)."""
        if stage.name not in self.fingerprints:
            self.fingerprints[stage.name] = stage_fingerprint(stage)
        return self.fingerprints[stage.name]

    def tree(self, cfg: DictConfig | View) -> dict[str, Any]:
        held = self.trees.get(id(cfg))
        if held is None or held[0] is not cfg:
            held = self.trees[id(cfg)] = (cfg, cfg.plain() if isinstance(cfg, View) else to_container(cfg))
        return held[1]

    def id_params(self, stage: Stage, cfg: DictConfig, args: Mapping[str, Any]) -> dict[str, Any]:
        tree = self.tree(cfg)
        key = json.dumps([stage.name, [get_path(tree, p) for p in stage.sections], args],
                         sort_keys=True, default=repr)
        if key not in self.params:
            try:
                self.params[key] = id_params(stage, tree, args)
            except ConfigError as exc:
                self.params[key] = exc
        found = self.params[key]
        if isinstance(found, ConfigError):
            raise ConfigError(str(found))
        return copy.deepcopy(found)


def _resolve(request: Request, tasks: dict[str, Task], order: list[str], problems: list[str],
             memo: _Memo) -> str | None:
    """The task id of ``request`` (planned into ``tasks``/``order``), or None when a stage's config is bad
    here or upstream: its ConfigError is added to ``problems`` and planning goes on."""
    stage = get_stage(request.stage)
    unknown = set(request.args) - set(stage.args)
    if unknown:
        raise ConfigError(f"stage '{stage.name}' takes no argument {', '.join(sorted(unknown))}; "
                          f"arguments: {', '.join(sorted(stage.args)) or 'none'}")
    args = {**stage.args, **request.args}
    try:
        upstream = {**stage.inputs(request.cfg, args), **request.extra_inputs}
    except ConfigError as exc:
        problems.append(str(exc))
        return None
    inputs = {name: req if isinstance(req, str) else _resolve(req, tasks, order, problems, memo)
              for name, req in upstream.items()}
    waits: list[str] = []
    try:
        params = memo.id_params(stage, request.cfg, args)
        needs = NEEDS[stage.name](request.cfg, args) if stage.name in NEEDS else []
    except ConfigError as exc:
        problems.append(str(exc))
        waits.append(str(exc))
    if None in inputs.values():
        return None
    waits += [f"its input '{name}' ({dep.split(PLACEHOLDER)[0]}, which waits too)" for name, dep in inputs.items()
              if PLACEHOLDER in dep]
    if waits:
        return _placeholder(stage, request, args, inputs, waits, tasks, order, memo) if memo.placeholders else None
    tree = memo.tree(request.cfg)
    fingerprint = memo.fingerprint(stage)
    code = stage_code(stage, fingerprint.digest, with_packages=bool((tree.get("run") or {}).get("id_includes_packages")))
    task_id = artifact_id(stage.name, code, params, inputs)
    if task_id not in tasks:
        tasks[task_id] = Task(stage.name, task_id, params, args, copy.deepcopy(tree), inputs, needs, code,
                              fingerprint.hashes())
        order.append(task_id)
    return task_id


PLACEHOLDER = "-?"
"""In a placeholder id (``extract-?3f2a…``): a task whose id cannot be computed yet."""


def _placeholder(stage: Stage, request: Request, args: dict[str, Any], inputs: dict[str, str], waits: list[str],
                 tasks: dict[str, Task], order: list[str], memo: _Memo) -> str:
    """Plan a task whose id cannot be computed yet (its params, or an input's, wait for something missing:
    weights, a data root) under a placeholder id (``<stage>-?<12 hex>`` of its sections, args and inputs), so
    that ``plan`` shows the whole DAG and what each part waits for. Never run: the problems stop a run."""
    tree = memo.tree(request.cfg)
    key = json.dumps([stage.name, [get_path(tree, p) for p in stage.sections], args, inputs], sort_keys=True,
                     default=repr)
    task_id = f"{stage.name}{PLACEHOLDER}{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if task_id not in tasks:
        tasks[task_id] = Task(stage.name, task_id, {}, dict(args), copy.deepcopy(tree), inputs, waits=waits)
        order.append(task_id)
    return task_id


def problems_error(problems: list[str]) -> ConfigError:
    """One error listing every problem (a single one as it stands), duplicates removed."""
    unique = list(dict.fromkeys(problems))
    if len(unique) == 1:
        return ConfigError(unique[0])
    return ConfigError(f"{len(unique)} problems:\n" + "\n".join(f"  - {p}" for p in unique))


def plan(requests: Iterable[Request], problems: list[str] | None = None, *,
         placeholders: bool = True) -> tuple[list[Task], list[str]]:
    """Resolve requests into deduplicated tasks in dependency order, and the ids the requests map to.

    Every request is planned, and every bad config found on the way is reported at once: one
    ConfigError listing them all; or, when a ``problems`` list is given, the messages are appended to it,
    and a task whose id cannot be computed because of one (or because an input's cannot) is planned as a
    placeholder (:data:`PLACEHOLDER` in its id, ``waits`` saying what for), so the whole DAG shows; with
    ``placeholders=False`` it is left out, with everything planned from it (what gc needs, faster).
    """
    tasks: dict[str, Task] = {}
    order: list[str] = []
    found: list[str] = []
    memo = _Memo()
    memo.placeholders = placeholders
    targets = [_resolve(request, tasks, order, found, memo) for request in requests]
    if problems is None and found:
        raise problems_error(found)
    if problems is not None:
        problems += [p for p in dict.fromkeys(found) if p not in problems]
    return [tasks[t] for t in order], [t for t in targets if t is not None]


def missing_needs(tasks: Iterable[Task]) -> list[str]:
    """Problem lines for everything the tasks need from outside the store that is not there."""
    return list(dict.fromkeys(need.problem() for task in tasks for need in task.needs if not need.ok))
