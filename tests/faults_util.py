"""Helpers of the fault-injection suites (tests/test_faults.py, tests/test_bad_inputs.py).

- :data:`TINY`: a whole pipeline in seconds (synthetic 8 train / 8 val images of 40×48, a random ViT-S/16 at
  32/48 px, shards of 2 samples: 4 shards per split, a few training steps).
- :func:`build`: run a stage (and what it needs) in this process; :func:`digests`: the files of an artifact
  with their sha256 as its manifest records them (the manifest itself excluded), for bit-identity checks.
- :class:`CliRun`: ``stegopipe ARGS`` in a separate process, either a fresh interpreter (``python -m
  pipeline.cli``, as a user runs it) or a fork of the test process (same code path, none of the 5-10 s
  interpreter start-up); its output goes to a log file. With ``fault="STAGE:EVENT:N[:SIGNAL]"`` the child
  kills itself at a point it reaches itself (the runner's ``STEGOPIPE_FAULT_KILL_AT`` hook: the stage's
  start, its N-th shard marker, or just before its manifest), never at a time measured from another run.
- :func:`flip_byte`: corrupt one byte of a file in place.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import MANIFEST, SHARD_MARKERS, ArtifactStore
from pipeline.config import load_config
from pipeline.executor import LOG_FILE, TaskResult
from pipeline.faults import FAULT_ENV
from pipeline.planner import Request, Task, plan
from pipeline.runner import run_tasks

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "run.executor=local", "run.device=cpu",
    "dataset.synthetic.n_train=8", "dataset.synthetic.n_val=8", "dataset.synthetic.height=40",
    "dataset.synthetic.width=48",
    "backbone.name=vit_small_patch16_224.dino", "backbone.weights=random",
    "extract.train_res=32", "extract.val_res=48", "extract.shard_size=2", "extract.batch_size=2",
    "extract.loader_workers=1",
    "knn.k=5",
    "head.num_neighbors=3", "head.steps=6", "head.batch_size=4", "head.val_every=3", "head.feature_samples=3",
    "head.dim=6", "head.loader_workers=1",
    "probe.steps=10", "probe.batch_size=4",
    "evaluate.crf_workers=1", "evaluate.examples=2",
]


def config(root: Path, *overrides: str) -> DictConfig:
    """The tiny config with ``run.root=root`` and ``overrides`` applied last."""
    return load_config(None, [*TINY, f"run.root={root}", *overrides])


def cli_args(stage: str, *overrides: str, args: dict[str, Any] | None = None) -> list[str]:
    """``run STAGE`` arguments of the CLI for the tiny config (root from ``STEGOPIPE_ROOT``)."""
    return ["run", stage, *TINY, *overrides, *(f"{k}={v}" for k, v in (args or {}).items())]


def plan_stage(root: Path, stage: str, *overrides: str, args: dict[str, Any] | None = None
               ) -> tuple[DictConfig, list[Task], str]:
    """(config, tasks in dependency order, id of the requested artifact)."""
    cfg = config(root, *overrides)
    tasks, targets = plan([Request(stage, cfg, args or {})])
    return cfg, tasks, targets[0]


def build(root: Path, stage: str, *overrides: str, args: dict[str, Any] | None = None,
          upstream_only: bool = False) -> TaskResult | None:
    """Run ``stage`` and its missing upstream in this process; with ``upstream_only`` only what it needs."""
    cfg, tasks, target = plan_stage(root, stage, *overrides, args=args)
    if upstream_only:
        run_tasks([t for t in tasks if t.id != target], cfg.run)
        return None
    return {r.id: r for r in run_tasks(tasks, cfg.run)}[target]


def manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def digests(path: Path) -> dict[str, str]:
    """``{relative file: sha256}`` of a published artifact, as its manifest records them (but its log)."""
    return {entry["path"]: entry["sha256"] for entry in manifest(path)["files"] if entry["path"] != LOG_FILE}


def markers(root: Path, artifact: str) -> list[str]:
    """Shard keys marked done in the staging folder of ``artifact``."""
    folder = Path(root) / ".staging" / artifact / SHARD_MARKERS
    return sorted(p.stem for p in folder.glob("*.done")) if folder.is_dir() else []


def forget(root: Path, artifact: str) -> None:
    """Remove a published artifact and its staging folder (a fresh start for the next fault)."""
    import shutil

    store = ArtifactStore(root)
    for path in (store.path(artifact), Path(root) / ".staging" / artifact):
        shutil.rmtree(path, ignore_errors=True)


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> int:
    """XOR the byte at ``offset`` (negative: from the end) of ``path`` with ``mask``; returns the offset."""
    data = bytearray(Path(path).read_bytes())
    offset %= len(data)
    data[offset] ^= mask
    Path(path).write_bytes(bytes(data))
    return offset


def _child_env(root: Path, fault: str | None) -> dict[str, str]:
    env = {"STEGOPIPE_ROOT": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return {**env, FAULT_ENV: fault} if fault else env


def _forked_cli(args: list[str], log: Path, env: dict[str, str]) -> None:
    """Body of a forked child: run the CLI with stdout/stderr on ``log``, exit with its status."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  (pytest's capture objects are not fd 1/2)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.environ.update(env)
        from pipeline.cli import main

        try:
            main(args=args, prog_name="stegopipe")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


@dataclass
class KillReport:
    killed: bool  # the process died of the fault's signal (it had not finished before the fault point)
    started: bool  # the stage's "[run] <id>" line had appeared
    markers: list[str]  # shard markers in the staging folder right after the kill


class CliRun:
    """``stegopipe ARGS`` in another process (``fork=True``: a fork of this process), output in ``log``;
    ``fault``: the child's ``STEGOPIPE_FAULT_KILL_AT`` (see :data:`pipeline.faults.FAULT_ENV`)."""

    def __init__(self, args: list[str], root: Path, log: Path, *, fork: bool = False,
                 fault: str | None = None) -> None:
        self.root, self.log = Path(root), Path(log)
        env = _child_env(root, fault)
        self.returncode: int | None = None
        if fork:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _forked_cli(list(args), self.log, env)
            self.pid, self._proc = pid, None
        else:
            with open(self.log, "w") as out:
                self._proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                                              env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
            self.pid = self._proc.pid

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._proc is not None:
                self.returncode = self._proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout_s: float = 300.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"stegopipe {self.pid} still running after {timeout_s:.0f}s:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> bool:
        """SIGKILL; True if the process was still running. Reaps it (a zombie would look alive)."""
        alive = self.poll() is None
        if alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait()
        return alive

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def killed_at_fault(self, artifact: str, timeout_s: float = 300.0) -> KillReport:
        """Wait for the child (started with ``fault``); what the fault left of ``artifact``."""
        code = self.wait(timeout_s)
        return KillReport(code == -signal.SIGKILL, f"[run] {artifact}" in self.output(), markers(self.root, artifact))
