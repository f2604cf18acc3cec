"""Running many tasks: :func:`run_tasks` executes the planned tasks whose artifact is missing (DVC ``repro``
semantics), in this process or on a Dask cluster (LocalCluster, an existing scheduler, or SLURM through
dask-jobqueue), independent tasks in parallel.

The framework around it, one module per concern: :mod:`pipeline.registry` (stages and what they declare),
:mod:`pipeline.planner` (requests → tasks with content-addressed ids), :mod:`pipeline.context` (what a
running stage sees), :mod:`pipeline.executor` (one task: lock, stage, validate, publish),
:mod:`pipeline.cluster` (Dask clients), :mod:`pipeline.environment` (device, git, package versions) and
:mod:`pipeline.faults` (fault injection for the crash tests).
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import ArtifactStore
from pipeline.cluster import dask_client
from pipeline.environment import resolve_device
from pipeline.errors import ConfigError, StageError, StegopipeError
from pipeline.executor import TaskResult, execute, is_cached, report_skipped
from pipeline.labels import Labeller, chain, store_lookup
from pipeline.progress import TOPIC, RunDisplay, relay_bars
from pipeline.planner import Task, missing_needs, problems_error
from pipeline.registry import get_stage, load_plugins, plugin_names

log = logging.getLogger("stegopipe")


@dataclass
class RemoteFailure:
    """A task's error sent back from a Dask worker as a value, with the worker's traceback."""

    error: StegopipeError
    traceback: str


def _relayed(artifact: str) -> contextlib.AbstractContextManager[None]:
    """On a Dask worker, :func:`~pipeline.progress.relay_bars` to the client (its display shows them); else
    (called directly) nothing."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return contextlib.nullcontext()
    return relay_bars(artifact, lambda message: worker.log_event(TOPIC, message))


def _execute_remote(task: Task, root: str, plugins: list[str], force: bool, device: str,
                    lock_timeout_s: float | None) -> TaskResult | RemoteFailure:
    """Dask entry point: a worker process imports the stage plugins, then runs the task, sending the state of
    its progress bars to the client (:func:`pipeline.progress.relay_bars`).

    A failure is returned, not raised: a raising task makes every worker (local or remote) log its full
    traceback ("Compute Failed"); the client raises the error as one line (``--debug``: the traceback).
    """
    try:
        load_plugins(plugins)
        with _relayed(task.id):
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


def _run_on_dask(client: Any, pending: list[Task], run_cfg: DictConfig, forced: set[str],
                 results: dict[str, TaskResult], display: RunDisplay) -> None:
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
                display.start(task.id, announce=True)  # the worker's log lines do not reach this console

    client.subscribe_topic(TOPIC, display.follow)  # the stages' progress, sent by relay_bars on the workers
    try:
        submit_ready()
        for future in completed:
            result = future.result()
            if isinstance(result, RemoteFailure):
                log.debug("traceback on the Dask worker:\n%s", result.traceback)
                raise result.error
            results[result.id] = result
            if result.status == "ran":
                report_skipped(result.id, ArtifactStore(run_cfg.root).manifest(result.id).get("skipped"))
            display.done(result.id, result.wall_s, result.headline)
            submit_ready()
    finally:
        client.unsubscribe_topic(TOPIC)


def run_tasks(tasks: list[Task], run_cfg: DictConfig, *, force_stages: Iterable[str] = (),
              only: set[str] | None = None, estimates: dict[str, float | None] | None = None,
              verbose: bool = False) -> list[TaskResult]:
    """Execute the tasks that are missing (or whose stage is forced), in dependency order, showing their
    progress (:class:`~pipeline.progress.RunDisplay`: ``estimates`` are the plan's seconds per task id,
    ``verbose`` lists the cached ones).

    ``only`` restricts execution to those ids (``--no-upstream``); their inputs must already exist.
    """
    forced = set(force_stages)
    store = ArtifactStore(run_cfg.root)
    labels = Labeller(chain({t.id: (t.stage, t.params, t.inputs) for t in tasks}.get, store_lookup(store)))
    for task in tasks:
        task.label = labels.text(task.id)
    results: dict[str, TaskResult] = {}
    pending = []
    hits = []
    for task in tasks:
        if only is not None and task.id not in only:
            continue
        if task.stage not in forced and is_cached(store, task.id, warn=True):
            results[task.id] = TaskResult(task.id, task.stage, "hit", store.path(task.id), 0.0)
            hits.append(task.id)
        else:
            pending.append(task)
    display = RunDisplay({t.id: t.stage for t in pending}, {t.id: t.label for t in tasks}, estimates,
                         verbose=verbose)
    for artifact in hits:
        display.hit(artifact)
    display.cached_summary()
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
    with display:
        if pending and executor == "local":
            for task in pending:
                display.start(task.id)
                result = results[task.id] = execute(task, str(run_cfg.root), force=task.stage in forced,
                                                    device=run_cfg.device, lock_timeout_s=timeout)
                display.done(task.id, result.wall_s, result.headline)
        elif pending:
            with dask_client(run_cfg) as client:
                _run_on_dask(client, pending, run_cfg, forced, results, display)
    return [results[t.id] for t in tasks if t.id in results]
