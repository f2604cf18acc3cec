"""A real Dask cluster with a worker lost: ``dask scheduler`` and 2 ``dask worker`` processes on 127.0.0.1,
started here with their own environment and working directory (they share only the artifact root and the
code), and ``stegopipe run ... --scheduler tcp://127.0.0.1:PORT`` as a user runs it.

One worker SIGKILLs itself at a point the run reaches (the runner's ``STEGOPIPE_FAULT_KILL_AT`` hook; both
workers carry it, ``STEGOPIPE_FAULT_ONCE`` lets only the first one fire), so whichever worker runs the stage
dies there and the other one must finish the run. The run must then end well, or fail with one clear line and
complete when run again; its artifacts must equal those of a local run.

- default suite: ``extract`` with its shards fanned out over the cluster, the worker running the stage killed
  after its second shard marker; the survivor resumes from the finished shards.
- ``slow``: a small experiment (tokens, kNN, a STEGO head, probes and evaluations of the head and the DINO
  baseline, a report), the worker killed while the head is staged; same report id and evaluations as locally.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.artifacts import ArtifactStore
from pipeline.experiments import Experiment
from pipeline.faults import FAULT_ENV, FAULT_ONCE_ENV
from pipeline.runner import run_tasks
from tests.faults_util import REPO, TINY, build, config, digests, manifest

DASK = Path(sys.executable).parent / "dask"
LOCAL = [o for o in TINY if not o.startswith("run.executor=")]  # with --scheduler, `auto` picks the cluster

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # workers compute on one thread: same floats


def _env(**extra: str) -> dict[str, str]:
    """A minimal environment of its own for a cluster process (nothing of this test process but PATH/HOME)."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "TQDM_DISABLE": "1", **extra}


def _start(args: list[str], cwd: Path, env: dict[str, str], procs: list[subprocess.Popen[bytes]]
           ) -> subprocess.Popen[bytes]:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "out.log", "wb") as log:  # each in its own process group: cleanup kills its children too
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    # reaped as soon as it exits, as a cluster's process manager would: an unreaped (zombie) worker's pid
    # still answers kill(pid, 0), so its stage lock would only be broken once its heartbeat is stale
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen[bytes]]
    dir: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.relative_to(self.dir)}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.dir.glob("*/out.log")))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[str], Cluster]]:
    """``cluster(fault)``: a scheduler on a free port (it picks one and writes it to its scheduler file) and
    2 single-threaded workers without nannies (a killed worker stays dead), both with the one-shot kill hook
    ``fault``, connected before it returns. Every process group is killed at the end of the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(fault: str) -> Cluster:
        from distributed import Client

        base = tmp_path / "cluster"
        scheduler_file = base / "scheduler.json"
        scheduler = _start([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", str(scheduler_file)], base / "scheduler", _env(), procs)
        deadline = time.monotonic() + 120
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            assert scheduler.poll() is None and time.monotonic() < deadline, (base / "scheduler/out.log").read_text()
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        env = _env(**{FAULT_ENV: fault, FAULT_ONCE_ENV: str(base / "fault-fired")})
        workers = [_start([str(DASK), "worker", address, "--name", f"w{k}", "--nthreads", "1", "--no-nanny",
                           "--no-dashboard", "--host", "127.0.0.1", "--local-directory", str(base / f"w{k}"),
                           "--death-timeout", "120"], base / f"w{k}", env, procs) for k in range(2)]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=180)
        return Cluster(address, workers, base)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stegopipe(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``stegopipe --quiet ARGS`` as a user runs it (a fresh interpreter with its own environment)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "--quiet", *args], cwd=REPO, text=True,
                          capture_output=True,
                          env=_env(STEGOPIPE_ROOT=str(root)), timeout=540)


def _run_with_a_lost_worker(cluster: Cluster, root: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run; exactly one worker must have died of the hook. A failed run must say why in one line and
    then complete when run again on what is left of the cluster."""
    done = _stegopipe(root, *args, "--scheduler", cluster.address)
    codes = [w.poll() for w in cluster.workers]
    assert codes.count(-signal.SIGKILL) == 1 and codes.count(None) == 1, (codes, done.stderr[-3000:], cluster.logs())
    assert "[fault] SIGKILL at" in cluster.logs()
    if done.returncode != 0:  # --quiet: the error is all there is
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
        done = _stegopipe(root, *args, "--scheduler", cluster.address)
    assert done.returncode == 0, done.stderr[-3000:] + cluster.logs()
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.mark.faults
def test_a_worker_killed_mid_extract_the_other_resumes_its_shards(cluster: Callable[[str], Cluster],
                                                                   tmp_path: Path) -> None:
    """extract with its 8 shards as Dask tasks; the worker running the stage dies after 2 shard markers."""
    overrides = ["dataset.synthetic.n_train=16", "extract.dask_shards=true"]
    root = tmp_path / "artifacts"
    done = _run_with_a_lost_worker(cluster("extract:shard:2"), root,
                                   ["run", "extract", *LOCAL, *overrides, "split=train"])
    built = Path(done.stdout.strip().splitlines()[-1])
    assert manifest(built)["shards"] == {"computed": 6, "reused": 2}  # the survivor kept the first two

    local = build(tmp_path / "local", "extract", *overrides, args={"split": "train"})
    assert local is not None and local.id == built.name
    assert digests(built) == digests(local.path)


@pytest.mark.slow
@pytest.mark.faults_full
def test_an_experiment_survives_a_lost_worker_and_matches_a_local_run(cluster: Callable[[str], Cluster],
                                                                      tmp_path: Path) -> None:
    """A small experiment (DINO baseline and a STEGO head, evaluated, one report); the worker running
    train-head dies with the head's files staged. Same report id and same evaluations as a local run."""
    spec = {"experiment": "tiny-cluster", "overrides": [*LOCAL, "probe.steps=5"],
            "matrix": [{"projection.method": ["identity", "stego"]}], "targets": ["evaluate"], "collect": "report"}
    path = tmp_path / "tiny-cluster.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    root = tmp_path / "artifacts"
    done = _run_with_a_lost_worker(cluster("train-head:publish:1"), root, ["run", str(path)])
    report = Path(done.stdout.strip().splitlines()[-1])

    local_root = tmp_path / "local"
    experiment = Experiment.load(str(path))
    tasks, targets = experiment.plan([f"run.root={local_root}", "run.executor=local"])
    results = {r.id: r for r in run_tasks(tasks, config(local_root, "run.executor=local").run)}
    assert report.name == targets[0] == results[targets[0]].path.name
    evaluations = [t.id for t in tasks if t.stage == "evaluate"]
    assert len(evaluations) == 2
    for artifact in [*evaluations, *(t.id for t in tasks if t.stage == "train-head"), targets[0]]:
        assert digests(ArtifactStore(root).path(artifact)) == digests(results[artifact].path), artifact
