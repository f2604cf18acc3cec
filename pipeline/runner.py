"""Stage registry, DAG resolution, skip-if-done execution, local or Dask.

A stage registers a ``run(ctx)`` function with its name, code version, artifact kind, the config
sections it reads, an optional ``params`` function and an ``inputs`` function (config + args → upstream
:class:`Request` s). The stage contract: the id params come from the declared sections with their
runtime-only fields removed (:func:`pipeline.config.setting`): by default those values as they are; a
``params`` function, when given, sees only them (a read-only view: reading a runtime field or an
undeclared section fails) and the request args, to validate and shape them. A running stage gets
``ctx.params``, ``ctx.config`` (that view) and ``ctx.runtime`` (the runtime fields and ``run``), never
the whole config. It writes its files into ``ctx.out``, adds manifest fields with ``ctx.record(...)``
(the one way) and returns None. :func:`plan` turns requests into a deduplicated,
topologically sorted list of :class:`Task` s whose ids are content addresses; :func:`run_tasks`
executes only tasks whose artifact is missing (DVC ``repro`` semantics), in-process or on a Dask
cluster (LocalCluster, an existing scheduler, or SLURM through dask-jobqueue), independent tasks in
parallel. A task runs under its artifact's lock in a staging folder; the runner validates the result
against the kind's storage spec and publishes it with a manifest. A failed stage publishes nothing.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import specs
from pipeline.artifacts import ArtifactStore, Staging, artifact_id, stage_of, utc_now
from pipeline.config import check_section, get_path, split_sections, to_container
from pipeline.errors import (ArtifactError, ConfigError, MissingArtifactError, StageError, StegopipeError,
                             did_you_mean)

log = logging.getLogger("stegopipe")

FAULT_ENV = "STEGOPIPE_FAULT_KILL_AT"
"""Fault-injection tests only (inert when unset): ``STAGE:EVENT:N[:SIGNAL]`` makes a process send itself
SIGKILL (or SIG<SIGNAL>, e.g. STOP) at the N-th ``EVENT`` of ``STAGE`` runs in it; events: ``start`` (the
stage begins, after its ``[run]`` line), ``shard`` (a shard marker was written) and ``publish`` (the files
are staged, the manifest is not yet written)."""
FAULT_ONCE_ENV = "STEGOPIPE_FAULT_ONCE"
"""With :data:`FAULT_ENV`: a file path; only the process that creates it fires (one fault per cluster)."""
_fault_counts: dict[tuple[str, str], int] = {}

ParamsFn = Callable[[DictConfig, Mapping[str, Any]], dict[str, Any]]
InputsFn = Callable[[DictConfig, Mapping[str, Any]], dict[str, "Request"]]


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    kind: str
    run: Callable[[StageContext], None]  # writes into ctx.out; manifest fields via ctx.record
    params: ParamsFn | None
    inputs: InputsFn
    args: Mapping[str, Any]
    resumable: bool
    make_target: str
    resources: Mapping[str, float]
    description: str
    sections: tuple[str, ...] = ()


STAGES: dict[str, Stage] = {}


def register_stage(
    name: str,
    *,
    version: str,
    kind: str,
    sections: tuple[str, ...] = (),
    params: ParamsFn | None = None,
    inputs: InputsFn | None = None,
    args: Mapping[str, Any] | None = None,
    resumable: bool = False,
    make_target: str | None = None,
    resources: Mapping[str, float] | None = None,
    description: str = "",
) -> Callable[[Callable[[StageContext], Any]], Callable[[StageContext], Any]]:
    """Decorator registering ``run(ctx)`` as a stage (see module docstring)."""

    def decorate(run: Callable[[StageContext], Any]) -> Callable[[StageContext], Any]:
        STAGES[name] = Stage(
            name=name, version=version, kind=kind, run=run, params=params, sections=tuple(sections),
            inputs=inputs or (lambda cfg, args: {}), args=dict(args or {}), resumable=resumable,
            make_target=make_target or f"make {name}", resources=dict(resources or {}),
            description=description or (run.__doc__ or "").strip().split("\n")[0],
        )
        return run

    return decorate


def config_view(tree: dict[str, Any]) -> DictConfig:
    """A read-only, struct-mode config of ``{section path: values}`` (missing keys raise)."""
    nested: dict[str, Any] = {}
    for path, values in tree.items():
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = values
    view = OmegaConf.create(nested)
    OmegaConf.set_struct(view, True)
    OmegaConf.set_readonly(view, True)
    return view


def id_params(stage: Stage, cfg: DictConfig | dict[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """The params of ``stage``'s artifact id under ``cfg`` (a config or its plain resolved dict; see the
    module docstring); checks the declared sections' choices and ranges first."""
    tree = cfg if isinstance(cfg, dict) else to_container(cfg)
    for path in stage.sections:
        check_section(path, get_path(tree, path))
    ident, _ = split_sections(tree, stage.sections)
    if stage.params is not None:
        return stage.params(config_view(ident), args)
    return ident[stage.sections[0]] if len(stage.sections) == 1 else ident  # every id field, as it is


def plugin_names() -> list[str]:
    """Modules that register stages and config sections: ``STEGOPIPE_PLUGINS`` (comma list), default ``stages.plugin``."""
    return [p for p in os.environ.get("STEGOPIPE_PLUGINS", "stages.plugin").split(",") if p]


def load_plugins(names: Iterable[str]) -> None:
    """Import the plugin modules (idempotent)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"STEGOPIPE_PLUGINS: cannot import plugin module '{name}' ({exc})") from exc


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'{did_you_mean(name, STAGES)}; stages: "
                          f"{', '.join(sorted(STAGES)) or '(none registered)'}")
    return STAGES[name]


@dataclass(frozen=True)
class Need:
    """Something outside the artifact store that a stage reads (a data root, a weights file)."""

    what: str  # e.g. "data root", "weights"
    path: str
    setting: str  # how to point at it, e.g. "dataset.root (make DATA_ROOT=..., or STEGOPIPE_DATA_ROOT)"
    ok: bool  # it exists

    def problem(self) -> str:
        return f"{self.what} {self.path} does not exist; set {self.setting}"


NeedsFn = Callable[[DictConfig, Mapping[str, Any]], list[Need]]
EstimateFn = Callable[["Task", ArtifactStore], "int | None"]
NEEDS: dict[str, NeedsFn] = {}
ESTIMATES: dict[str, EstimateFn] = {}


def register_needs(stage: str, needs: NeedsFn) -> None:
    """Declare what a stage reads from outside the store; ``plan`` shows it and ``run`` checks it first."""
    NEEDS[stage] = needs


def register_estimate(stage: str, estimate: EstimateFn) -> None:
    """Declare a size estimate (bytes) of a stage's missing artifact, shown by ``stegopipe plan``."""
    ESTIMATES[stage] = estimate


@dataclass(frozen=True)
class Request:
    """Ask for the artifact of ``stage`` under ``cfg`` with request ``args`` (e.g. split=val).

    ``extra_inputs`` adds inputs beyond the stage's own: requests, or ids of tasks already planned.
    """

    stage: str
    cfg: DictConfig = field(compare=False, hash=False)
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


class _Memo:
    """What one ``plan`` call computes once: each config's plain resolved dict (by config object; the
    configs are held so their ids stay theirs), and each stage's id params, or its ConfigError, by the
    stage, its sections' values and args (files a params function reads do not change while one plan runs)."""

    def __init__(self) -> None:
        self.trees: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.params: dict[str, dict[str, Any] | ConfigError] = {}

    def tree(self, cfg: DictConfig) -> dict[str, Any]:
        held = self.trees.get(id(cfg))
        if held is None or held[0] is not cfg:
            held = self.trees[id(cfg)] = (cfg, to_container(cfg))
        return held[1]

    def id_params(self, stage: Stage, cfg: DictConfig, args: Mapping[str, Any]) -> dict[str, Any]:
        tree = self.tree(cfg)
        key = json.dumps([stage.name, stage.version, [get_path(tree, p) for p in stage.sections], args],
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
    try:
        params = memo.id_params(stage, request.cfg, args)
        needs = NEEDS[stage.name](request.cfg, args) if stage.name in NEEDS else []
    except ConfigError as exc:
        problems.append(str(exc))
        return None
    if None in inputs.values():
        return None
    task_id = artifact_id(stage.name, stage.version, params, inputs)
    if task_id not in tasks:
        tasks[task_id] = Task(stage.name, task_id, params, args, copy.deepcopy(memo.tree(request.cfg)), inputs,
                              needs)
        order.append(task_id)
    return task_id


def problems_error(problems: list[str]) -> ConfigError:
    """One error listing every problem (a single one as it stands), duplicates removed."""
    unique = list(dict.fromkeys(problems))
    if len(unique) == 1:
        return ConfigError(unique[0])
    return ConfigError(f"{len(unique)} problems:\n" + "\n".join(f"  - {p}" for p in unique))


def plan(requests: Iterable[Request], problems: list[str] | None = None) -> tuple[list[Task], list[str]]:
    """Resolve requests into deduplicated tasks in dependency order, and the ids the requests map to.

    Every request is planned, and every bad config found on the way is reported at once: one
    ConfigError listing them all; or, when a ``problems`` list is given, the messages are appended to it
    and the requests that cannot be planned are left out of the tasks and targets.
    """
    tasks: dict[str, Task] = {}
    order: list[str] = []
    found: list[str] = []
    memo = _Memo()
    targets = [_resolve(request, tasks, order, found, memo) for request in requests]
    if problems is None and found:
        raise problems_error(found)
    if problems is not None:
        problems += [p for p in dict.fromkeys(found) if p not in problems]
    return [tasks[t] for t in order], [t for t in targets if t is not None]


def missing_needs(tasks: Iterable[Task]) -> list[str]:
    """Problem lines for everything the tasks need from outside the store that is not there."""
    return list(dict.fromkeys(need.problem() for task in tasks for need in task.needs if not need.ok))


# --------------------------------------------------------------------------------------------------
# execution of one task
# --------------------------------------------------------------------------------------------------


@dataclass
class InputArtifact:
    id: str
    path: Path
    manifest: dict[str, Any]


@dataclass
class StageContext:
    """What a running stage sees: params, inputs, a staging folder, shard markers, the manifest extras."""

    task: Task
    store: ArtifactStore
    staging: Staging
    inputs: dict[str, InputArtifact]
    device: str
    sections: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    shards_computed: int = 0
    shards_reused: int = 0
    shard_executor: str = "local"  # where map_shards ran the shards: local | dask

    @property
    def params(self) -> dict[str, Any]:
        """The id params (what the artifact id was computed from)."""
        return self.task.params

    @property
    def args(self) -> dict[str, Any]:
        return self.task.args

    @property
    def config(self) -> DictConfig:
        """The declared sections without their runtime fields (read-only; all of it is covered by the id)."""
        return config_view(split_sections(OmegaConf.create(self.task.cfg), self.sections)[0])

    @property
    def runtime(self) -> DictConfig:
        """The runtime-only fields of the declared sections, and ``run`` (none of it changes the id)."""
        return config_view(split_sections(OmegaConf.create(self.task.cfg), self.sections)[1])

    @property
    def out(self) -> Path:
        """The staging folder the stage writes its files into."""
        return self.staging.dir

    def input(self, name: str) -> InputArtifact:
        if name not in self.inputs:
            raise StageError(f"stage {self.task.stage} has no input '{name}' (inputs: {', '.join(self.inputs)})")
        return self.inputs[name]

    def shards(self, keys: Iterable[str]) -> Iterator[str]:
        """Yield the shard keys still to compute (finished ones are skipped and counted as reused).

        The stage must call :meth:`shard_finished` after a yielded shard's data is durably written.
        """
        for key in keys:
            if self.staging.shard_done(key):
                self.shards_reused += 1
                continue
            yield key

    def shard_finished(self, key: str) -> None:
        self.staging.mark_shard_done(key)
        self.shards_computed += 1
        log.debug("shard %s of %s done", key, self.task.id)
        _fault_point(self.task.stage, "shard")

    def map_shards(self, fn: Callable[..., Any], todo: Mapping[str, tuple[Any, ...]], *, dask: bool = True,
                   resources: Mapping[str, float] | None = None,
                   local: Callable[[list[str]], None] | None = None) -> Iterator[tuple[str, Any]]:
        """Compute the shards ``todo`` (key → args of ``fn``) and mark each done when it is written;
        yields ``(key, fn's result)`` as shards finish. The one fan-out of every sharded stage.

        With ``dask`` and a client (:func:`shard_client`): one Dask task per shard (``resources`` on
        CUDA), the others cancelled when one fails; the artifact must then live on a filesystem the
        workers share. Else in this process: ``local(keys)`` when given (the stage's own pipeline, which
        marks its shards itself), otherwise ``fn`` one shard after another.
        """
        if not todo:
            return
        with shard_client(self.runtime.run) if dask else contextlib.nullcontext() as client:
            if client is None:
                self.shard_executor = "local"
                if local is not None:
                    local(list(todo))
                    return
                for key, args in todo.items():
                    result = fn(*args)
                    self.shard_finished(key)
                    yield key, result
                return
            from distributed import as_completed

            self.shard_executor = "dask"
            wanted = dict(resources) if resources and self.device == "cuda" else None
            futures = {client.submit(fn, *args, pure=False, key=f"{self.task.id}-{key}-{time.time_ns()}",
                                     resources=wanted): key for key, args in todo.items()}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    self.shard_finished(futures[future])
                    yield futures[future], result
            except BaseException:
                client.cancel(list(futures))
                raise

    def record(self, **values: Any) -> None:
        """Add fields (counts, throughput, seeds, skipped inputs, ...) to the manifest: the one way a stage
        adds them (a later call's field replaces an earlier one of the same name)."""
        self.extras.update(values)


@contextlib.contextmanager
def shard_client(run_cfg: Any) -> Iterator[Any]:
    """The Dask client shards fan out to: inside a Dask task, the worker's own (the task secedes while it
    waits for its shards); else this process's current client, or one for ``run.scheduler``; else None."""
    try:
        from distributed import Client, get_client, get_worker, worker_client
    except ImportError:
        yield None
        return
    try:
        get_worker()
    except ValueError:
        pass
    else:
        with worker_client() as client:
            yield client
        return
    try:
        current = get_client()
    except ValueError:
        current = None
    if current is not None:
        yield current
    elif run_cfg.get("scheduler"):
        with Client(run_cfg.scheduler) as client:
            yield client
    else:
        yield None


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


@cache
def code_version() -> dict[str, Any]:
    """git sha and dirty flag of the checkout the code runs from (``unknown`` outside git)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "dirty": None}
    return {"git_sha": sha, "dirty": dirty}


PACKAGES: list[str] = ["omegaconf", "dask", "distributed"]
"""Distributions whose versions every manifest records: the framework's, then those plugins add."""


def register_packages(*names: str) -> None:
    """Let a plugin name the distributions its stages depend on (recorded in every manifest)."""
    PACKAGES.extend(n for n in names if n not in PACKAGES)
    package_versions.cache_clear()


@cache
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@dataclass
class TaskResult:
    id: str
    stage: str
    status: str  # "hit" | "ran"
    path: Path
    wall_s: float
    headline: str = ""  # the stage's one-line summary (its manifest's ``headline``), for the console


LOG_FILE = "log.txt"
MAX_LISTED = 10


def _done_line(result: TaskResult) -> None:
    log.info("[done] %s in %.1fs%s", result.id, result.wall_s, f": {result.headline}" if result.headline else "")


@contextlib.contextmanager
def _stage_log(path: Path) -> Iterator[None]:
    """Copy the log records (and Python warnings) emitted while a stage runs into ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        logging.root.removeHandler(handler)
        handler.close()


def _report_skipped(artifact: str, skipped: Any) -> None:
    """List the inputs a stage left out (its ``skipped`` rows: id and reason) on the console."""
    if not isinstance(skipped, list) or not skipped:
        return
    rows = [f"{row.get('id', '?')}: {row.get('reason', '?')}" if isinstance(row, dict) else str(row)
            for row in skipped[:MAX_LISTED]]
    more = f"\n  ... and {len(skipped) - MAX_LISTED} more (`stegopipe show {artifact} --json`)" \
        if len(skipped) > MAX_LISTED else ""
    log.warning("%s skipped %d bad input(s):\n  %s%s", artifact, len(skipped), "\n  ".join(rows), more)


def _fault_point(stage: str, event: str) -> None:
    """Count an ``event`` of ``stage`` for the fault-injection hook (:data:`FAULT_ENV`); no-op when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_stage, want_event, n, *sig = spec.split(":")
    if (want_stage, want_event) != (stage, event):
        return
    count = _fault_counts[stage, event] = _fault_counts.get((stage, event), 0) + 1
    if count != int(n):
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    name = f"SIG{sig[0] if sig else 'KILL'}"
    print(f"[fault] {name} at {spec} (pid {os.getpid()})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), getattr(signal, name))


def execute(task: Task, root: str, *, force: bool = False, device: str = "auto",
            lock_timeout_s: float | None = None) -> TaskResult:
    """Run one task unless its artifact exists; under the artifact's lock; publish atomically."""
    return _execute(task, get_stage(task.stage), root, force=force, device=device, lock_timeout_s=lock_timeout_s)


def import_artifact(root: str, *, stage: str, kind: str, version: str, params: dict[str, Any],
                    write: Callable[[StageContext], None], description: str = "") -> TaskResult:
    """Publish an artifact made outside the stage graph (an imported checkpoint or store).

    The id is content-addressed from ``stage``/``version``/``params`` like any other; ``write(ctx)``
    fills ``ctx.out`` (manifest fields via ``ctx.record``); the result is checked against the ``kind``
    spec and published atomically.
    """
    task = Task(stage, artifact_id(stage, version, params, {}), params, {}, {}, {})
    pseudo = Stage(name=stage, version=version, kind=kind, run=write, params=lambda cfg, args: params,
                   inputs=lambda cfg, args: {}, args={}, resumable=False, make_target=f"stegopipe {stage}",
                   resources={}, description=description)
    return _execute(task, pseudo, root)


def is_cached(store: ArtifactStore, artifact: str, *, warn: bool = False) -> bool:
    """True when ``artifact`` is published and whole: every file its manifest lists is present with its
    size (a cheap check, no hashing). An incomplete one (e.g. a gc killed mid-way by an older version)
    counts as missing, so it is rebuilt; ``warn`` says so, naming the files."""
    if not store.exists(artifact):
        return False
    try:
        bad = store.incomplete(artifact)
    except ArtifactError as exc:
        bad = [str(exc)]
    if bad and warn:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        log.warning("artifact %s is incomplete (missing or cut short: %s%s); rebuilding it",
                    artifact, ", ".join(bad[:3]), more)
    return not bad


def _missing_input(task: Task, name: str, dep: str, *, while_running: bool = False) -> MissingArtifactError:
    what = "disappeared while the stage ran" if while_running else "is missing"
    return MissingArtifactError(
        f"stage {task.stage}: input artifact '{name}' ({dep}) {what} (not built yet, or removed by `stegopipe gc` "
        f"or by hand); build it with `{get_stage(stage_of(dep)).make_target}` (or `stegopipe run` without "
        f"--no-upstream) and run again")


def _check_input(store: ArtifactStore, task: Task, name: str, dep: str) -> None:
    """With ``run.verify_inputs`` (default), refuse to run on a damaged input artifact: its manifest's own
    checksum and every file's size, and the sha256 of every file when the artifact holds at most
    ``run.verify_hash_mb`` MiB (bigger inputs, e.g. token stores at scale: ``stegopipe verify``)."""
    run_cfg = task.cfg.get("run") or {}
    if not run_cfg.get("verify_inputs", True):
        return
    problems = store.verify(dep, hash_max_bytes=0)  # the manifest's own checksum and the file sizes
    if not problems:
        total = sum(entry["size"] for entry in store.manifest(dep).get("files", []))
        if total <= float(run_cfg.get("verify_hash_mb", 64.0)) * 2**20:
            problems = store.verify(dep)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(
            f"stage {task.stage}: input '{name}' ({dep}) is damaged: {problems[0]}{more}; `stegopipe verify {dep}` "
            f"lists the damage; delete {store.path(dep)} and run again to rebuild it")


def _execute(task: Task, stage: Stage, root: str, *, force: bool = False, device: str = "auto",
             lock_timeout_s: float | None = None) -> TaskResult:
    store = ArtifactStore(root)
    if not force and is_cached(store, task.id):
        return TaskResult(task.id, task.stage, "hit", store.path(task.id), 0.0)
    store.require_writable()
    lock = store.lock(task.id, info={"inputs": sorted(set(task.inputs.values()))})  # gc keeps these
    lock.acquire(timeout_s=lock_timeout_s)
    try:
        if not force and is_cached(store, task.id):  # another process finished it while we waited
            return TaskResult(task.id, task.stage, "hit", store.path(task.id), 0.0)
        inputs = {}
        for name, dep in task.inputs.items():
            if not store.exists(dep):
                raise _missing_input(task, name, dep)
            _check_input(store, task, name, dep)
            inputs[name] = InputArtifact(dep, store.path(dep), store.manifest(dep))
        staging = store.staging(task.id, fresh=not stage.resumable or force)
        ctx = StageContext(task, store, staging, inputs, resolve_device(device), stage.sections)
        start = time.perf_counter()
        try:
            with _stage_log(staging.dir / LOG_FILE):
                log.info("[run] %s", task.id)
                _fault_point(task.stage, "start")
                if stage.run(ctx) is not None:
                    raise StageError(f"stage {task.stage} returned a value; a stage returns None and adds "
                                     "manifest fields with ctx.record(...)")
                _report_skipped(task.id, ctx.extras.get("skipped"))
        except Exception as exc:
            gone = [(name, dep) for name, dep in task.inputs.items() if not store.exists(dep)]
            if gone:  # the cause, not its symptom (a file the stage could no longer read)
                raise _missing_input(task, *gone[0], while_running=True) from exc
            if isinstance(exc, StegopipeError):
                raise
            # a stage bug or an environment failure: say which stage, keep the cause
            raise StageError(f"stage {task.stage} ({task.id}) failed: {type(exc).__name__}: {exc}") from exc
        wall = time.perf_counter() - start
        specs.validate(stage.kind, staging.dir)
        manifest = {
            "stage": task.stage, "kind": stage.kind, "version": stage.version, "params": task.params,
            "args": task.args, "inputs": task.inputs, "created": utc_now(), "wall_time_s": round(wall, 3),
            "host": socket.gethostname(), "device": ctx.device, "code": code_version(),
            "packages": package_versions(),
            "shards": {"computed": ctx.shards_computed, "reused": ctx.shards_reused},
            **ctx.extras,
        }
        _fault_point(task.stage, "publish")
        try:
            path = store.publish(task.id, staging, manifest)
        except OSError as exc:  # e.g. a full disk while hashing or writing the manifest
            raise ArtifactError(f"stage {task.stage}: could not publish {task.id} ({exc}); nothing was "
                                f"published, the staged work in {staging.dir} is kept for the next run") from exc
    finally:
        lock.release()
    done = TaskResult(task.id, task.stage, "ran", path, wall, str(manifest.get("headline") or ""))
    _done_line(done)
    return done


# --------------------------------------------------------------------------------------------------
# execution of many tasks
# --------------------------------------------------------------------------------------------------


@dataclass
class RemoteFailure:
    """A task's error sent back from a Dask worker as a value, with the worker's traceback."""

    error: StegopipeError
    traceback: str


def _execute_remote(task: Task, root: str, plugins: list[str], force: bool, device: str,
                    lock_timeout_s: float | None) -> TaskResult | RemoteFailure:
    """Dask entry point: a worker process imports the stage plugins, then runs the task.

    A failure is returned, not raised: a raising task makes every worker (local or remote) log its full
    traceback ("Compute Failed"); the client raises the error as one line (``--debug``: the traceback).
    """
    try:
        load_plugins(plugins)
        return execute(task, root, force=force, device=device, lock_timeout_s=lock_timeout_s)
    except Exception as exc:
        error = exc if isinstance(exc, StegopipeError) else StageError(
            f"stage {task.stage} ({task.id}) failed on a Dask worker: {type(exc).__name__}: {exc}")
        return RemoteFailure(error, traceback.format_exc())


def _has_parallelism(pending: list[Task]) -> bool:
    """True when two pending tasks could run at the same time (neither depends on the other)."""
    ids = {t.id for t in pending}
    depth: dict[str, int] = {}
    for task in pending:  # tasks are in dependency order
        depth[task.id] = 1 + max((depth[d] for d in task.inputs.values() if d in ids), default=-1)
    levels = list(depth.values())
    return len(levels) != len(set(levels))


def quiet_dask_logs() -> None:
    """Cluster chatter only at debug level (distributed sets its loggers to INFO when imported)."""
    if not log.isEnabledFor(logging.DEBUG):
        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
                logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def dask_client(run_cfg: DictConfig) -> Iterator[Any]:
    """A Dask client for ``run.scheduler`` (existing cluster), ``run.cluster=slurm`` or a LocalCluster."""
    from distributed import Client, LocalCluster

    quiet_dask_logs()

    if run_cfg.scheduler:
        with Client(run_cfg.scheduler) as client:
            yield client
        return
    if run_cfg.cluster == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError as exc:
            raise ConfigError("run.cluster=slurm needs dask-jobqueue: pip install 'stegopipe[slurm]'") from exc
        slurm = run_cfg.slurm
        extra = list(slurm.job_extra_directives) + ([f"--gres=gpu:{slurm.gpus_per_job}"] if slurm.gpus_per_job else [])
        worker_extra = ["--resources", f"GPU={slurm.gpus_per_job}"] if slurm.gpus_per_job else []
        with SLURMCluster(queue=slurm.queue, account=slurm.account, cores=slurm.cores, memory=slurm.memory,
                          walltime=slurm.walltime, job_extra_directives=extra, worker_extra_args=worker_extra,
                          local_directory=slurm.local_directory) as cluster:
            cluster.scale(jobs=slurm.jobs)
            with Client(cluster) as client:
                yield client
        return
    if run_cfg.cluster != "local":
        raise ConfigError(f"run.cluster={run_cfg.cluster!r}: expected 'local' or 'slurm'")
    import dask

    workers = run_cfg.workers or os.cpu_count() or 1
    resources = {"GPU": 1} if resolve_device(run_cfg.device) == "cuda" else {}
    settings = {
        # a single-threaded worker holds one stage task at a time, so independent stages spread out
        "distributed.scheduler.worker-saturation": 1.0,
        # stages may start process pools of their own (CRF), which daemonic processes cannot
        "distributed.worker.daemon": False,
        # one compute thread per worker process; progress bars are the client's job
        "distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": 1,
                                                 "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1, "TQDM_DISABLE": 1,
                                                 "DASK_LOGGING__DISTRIBUTED": "error"},
    }
    with dask.config.set(settings), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      resources=resources or None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def _run_on_dask(client: Any, pending: list[Task], run_cfg: DictConfig, forced: set[str],
                 results: dict[str, TaskResult]) -> None:
    """Submit each task once its inputs are done (so tasks are balanced over workers, not pinned to
    the worker that ran their input), and collect results as they complete."""
    from distributed import as_completed

    client.run(load_plugins, plugin_names())  # every worker imports the stages now, in parallel
    waiting = list(pending)
    pending_ids = {t.id for t in pending}
    gpu = resolve_device(run_cfg.device) == "cuda"  # CPU clusters advertise no GPU resource
    completed = as_completed()

    def submit_ready() -> None:
        for task in list(waiting):
            if all(d in results or d not in pending_ids for d in task.inputs.values()):
                waiting.remove(task)
                stage = get_stage(task.stage)
                completed.add(client.submit(
                    _execute_remote, task, str(run_cfg.root), plugin_names(), task.stage in forced,
                    run_cfg.device, run_cfg.lock_timeout_s, key=f"{task.id}-{time.time_ns()}", pure=False,
                    resources=(dict(stage.resources) or None) if gpu else None))

    submit_ready()
    # log lines go through tqdm.write while the bar is shown, so they never land on a bar fragment
    with logging_redirect_tqdm(), tqdm(total=len(pending), unit="stage", desc="stages", leave=False) as progress:
        for future in completed:
            result = future.result()
            if isinstance(result, RemoteFailure):
                log.debug("traceback on the Dask worker:\n%s", result.traceback)
                raise result.error
            results[result.id] = result
            if result.status == "ran":  # the worker's log lines do not reach this console
                _report_skipped(result.id, ArtifactStore(run_cfg.root).manifest(result.id).get("skipped"))
            _done_line(result)
            progress.update()
            submit_ready()


def run_tasks(tasks: list[Task], run_cfg: DictConfig, *, force_stages: Iterable[str] = (),
              only: set[str] | None = None) -> list[TaskResult]:
    """Execute the tasks that are missing (or whose stage is forced), in dependency order.

    ``only`` restricts execution to those ids (``--no-upstream``); their inputs must already exist.
    """
    forced = set(force_stages)
    store = ArtifactStore(run_cfg.root)
    results: dict[str, TaskResult] = {}
    pending = []
    for task in tasks:
        if only is not None and task.id not in only:
            continue
        if task.stage not in forced and is_cached(store, task.id, warn=True):
            results[task.id] = TaskResult(task.id, task.stage, "hit", store.path(task.id), 0.0)
            log.info("[hit] %s", task.id)
        else:
            pending.append(task)
    missing = missing_needs(pending)
    if missing:  # before any work: everything missing at once
        raise problems_error(missing)
    if pending:
        store.require_writable()
    executor = run_cfg.executor
    if executor not in ("auto", "local", "dask"):
        raise ConfigError(f"run.executor={executor!r}: expected auto, local or dask")
    if executor == "auto":
        executor = "dask" if (run_cfg.scheduler or run_cfg.cluster == "slurm" or _has_parallelism(pending)) else "local"
    timeout = run_cfg.lock_timeout_s
    if pending and executor == "local":
        for task in pending:
            results[task.id] = execute(task, str(run_cfg.root), force=task.stage in forced,
                                       device=run_cfg.device, lock_timeout_s=timeout)
    elif pending:
        with dask_client(run_cfg) as client:
            _run_on_dask(client, pending, run_cfg, forced, results)
    return [results[t.id] for t in tasks if t.id in results]
