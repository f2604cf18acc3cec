"""Execution of one task: skip when cached, else under the artifact's lock in a staging folder; check the
inputs, run the stage, validate the result against the kind's storage spec and publish it with its
manifest. A failed stage publishes nothing."""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import specs
from pipeline.artifacts import ArtifactStore, artifact_id, manifest_bytes, stage_of, utc_now
from pipeline.context import InputArtifact, StageContext
from pipeline.environment import code_version, package_versions, resolve_device
from pipeline.errors import ArtifactError, MissingArtifactError, StageError, StegopipeError
from pipeline.faults import fault_point
from pipeline.fingerprint import Fingerprint, changed_code
from pipeline.planner import Task
from pipeline.registry import Stage, get_stage, stage_code, stage_fingerprint

log = logging.getLogger("stegopipe")


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


def report_skipped(artifact: str, skipped: Any) -> None:
    """List the inputs a stage left out (its ``skipped`` rows: id and reason) on the console."""
    if not isinstance(skipped, list) or not skipped:
        return
    rows = [f"{row.get('id', '?')}: {row.get('reason', '?')}" if isinstance(row, dict) else str(row)
            for row in skipped[:MAX_LISTED]]
    more = f"\n  ... and {len(skipped) - MAX_LISTED} more (`stegopipe show {artifact} --json`)" \
        if len(skipped) > MAX_LISTED else ""
    log.warning("%s skipped %d bad input(s):\n  %s%s", artifact, len(skipped), "\n  ".join(rows), more)




def execute(task: Task, root: str, *, force: bool = False, device: str = "auto",
            lock_timeout_s: float | None = None) -> TaskResult:
    """Run one task unless its artifact exists; under the artifact's lock; publish atomically."""
    return _execute(task, get_stage(task.stage), root, force=force, device=device, lock_timeout_s=lock_timeout_s)


def import_artifact(root: str, *, stage: str, kind: str, format_version: str, params: dict[str, Any],
                    write: Callable[[StageContext], None], description: str = "") -> TaskResult:
    """Publish an artifact made outside the stage graph (an imported checkpoint or store).

    The id is content-addressed like any other, from ``stage``, the code fingerprint of ``write``'s
    module with ``format_version``, and ``params``; ``write(ctx)`` fills ``ctx.out`` (manifest fields
    via ``ctx.record``); the result is checked against the ``kind`` spec and published atomically.
    """
    pseudo = Stage(name=stage, format_version=format_version, kind=kind, run=write, params=None,
                   inputs=lambda cfg, args: {}, args={}, resumable=False, make_target=f"stegopipe {stage}",
                   resources={}, description=description)
    fingerprint = stage_fingerprint(pseudo)
    code = stage_code(pseudo, fingerprint.digest)
    task = Task(stage, artifact_id(stage, code, params, {}), params, {}, {}, {}, code=code,
                code_files=fingerprint.hashes())
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


def _checked_input(store: ArtifactStore, task: Task, name: str, dep: str) -> dict[str, Any]:
    """The manifest of input ``dep``, read once. With ``run.verify_inputs`` (default), refuse to run on a
    damaged input artifact: its manifest's own checksum and every file's size, and the sha256 of every file
    when the artifact holds at most ``run.verify_hash_mb`` MiB (bigger inputs, e.g. token stores at scale:
    ``stegopipe verify``)."""
    run_cfg = task.cfg.get("run") or {}
    verify = run_cfg.get("verify_inputs", True)
    try:
        manifest = store.manifest(dep)
    except ArtifactError as exc:
        if not verify:
            raise
        problems = [str(exc)]
    else:
        if not verify:
            return manifest
        small = manifest_bytes(manifest) <= float(run_cfg.get("verify_hash_mb", 64.0)) * 2**20
        problems = store.verify(dep, hash_max_bytes=None if small else 0, manifest=manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(
            f"stage {task.stage}: input '{name}' ({dep}) is damaged: {problems[0]}{more}; `stegopipe verify {dep}` "
            f"lists the damage; delete {store.path(dep)} and run again to rebuild it")
    return manifest


def load_inputs(store: ArtifactStore, task: Task) -> dict[str, InputArtifact]:
    """``task``'s input artifacts, each present and checked (see :func:`_checked_input`)."""
    inputs = {}
    for name, dep in task.inputs.items():
        if not store.exists(dep):
            raise _missing_input(task, name, dep)
        inputs[name] = InputArtifact(dep, store.path(dep), _checked_input(store, task, name, dep))
    return inputs


def _same_code(task: Task, stage: Stage) -> Fingerprint:
    """This process's fingerprint of ``stage``; a StageError naming the host and the differing files when
    it is not the one ``task`` was planned with (stale code on a cluster node, or files edited since
    the plan), so that no result of other code is published under the task's id."""
    fingerprint = stage_fingerprint(stage)
    if fingerprint.digest != task.code.get("fingerprint"):
        differing = changed_code(task.code_files, fingerprint.hashes()) or ["(the fingerprint rules)"]
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise StageError(
            f"{socket.gethostname()} refuses {task.id}: its code of stage {task.stage} differs from the planner's "
            f"in {', '.join(differing[:5])}{more}; give it the same code (update the checkout, restart its workers) "
            "or plan again")
    return fingerprint


def _execute(task: Task, stage: Stage, root: str, *, force: bool = False, device: str = "auto",
             lock_timeout_s: float | None = None) -> TaskResult:
    store = ArtifactStore(root)
    if not force and is_cached(store, task.id):
        return TaskResult(task.id, task.stage, "hit", store.path(task.id), 0.0)
    store.require_writable()
    fingerprint = _same_code(task, stage)
    lock = store.lock(task.id, info={"inputs": sorted(set(task.inputs.values()))})  # gc keeps these
    lock.acquire(timeout_s=lock_timeout_s)
    try:
        if not force and is_cached(store, task.id):  # another process finished it while we waited
            return TaskResult(task.id, task.stage, "hit", store.path(task.id), 0.0)
        inputs = load_inputs(store, task)
        staging = store.staging(task.id, fresh=not stage.resumable or force)
        ctx = StageContext(task, store, staging, inputs, resolve_device(device), stage.sections)
        start = time.perf_counter()
        try:
            with _stage_log(staging.dir / LOG_FILE):
                log.info("[run] %s%s", task.id, f" {task.label}" if task.label else "")
                fault_point(task.stage, "start")
                if stage.run(ctx) is not None:
                    raise StageError(f"stage {task.stage} returned a value; a stage returns None and adds "
                                     "manifest fields with ctx.record(...)")
                report_skipped(task.id, ctx.extras.get("skipped"))
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
            "stage": task.stage, "kind": stage.kind, "version": task.code, "fingerprint": fingerprint.record(),
            "params": task.params,
            "args": task.args, "inputs": task.inputs, "created": utc_now(), "wall_time_s": round(wall, 3),
            "host": socket.gethostname(), "device": ctx.device, "code": code_version(),
            "packages": package_versions(),
            "shards": {"computed": ctx.shards_computed, "reused": ctx.shards_reused},
            **ctx.extras,
        }
        fault_point(task.stage, "publish")
        try:
            path = store.publish(task.id, staging, manifest)
        except OSError as exc:  # e.g. a full disk while hashing or writing the manifest
            raise ArtifactError(f"stage {task.stage}: could not publish {task.id} ({exc}); nothing was "
                                f"published, the staged work in {staging.dir} is kept for the next run") from exc
    finally:
        lock.release()
    return TaskResult(task.id, task.stage, "ran", path, wall, str(manifest.get("headline") or ""))
