"""pipeline/slurm.py and scheduled cluster runs on a real one-node SLURM.

The tests marked ``slurm`` (``make test-slurm``, not in ``make test``) need the cluster; the sizing rule and
the replacement of lost worker jobs are also checked without one, in the default suite.

The cluster (:mod:`tests.slurm_cluster`) runs ``scripts/nightly.sbatch`` as a user submits it, with a tiny
experiment (synthetic data, tokens, the DINO baseline's probe and evaluation, a report: 8 artifacts). The
driver job asks for 1 CPU and submits one 1-core Dask worker job through dask-jobqueue; every stage runs on it.

A point in the middle of a run is one the run reaches itself: the worker freezes itself (SIGSTOP, the
runner's ``STEGOPIPE_FAULT_KILL_AT`` hook) when ``probe`` starts, holding its lock, with the tokens
published. The test then requeues the driver, sends it the time-limit signal, or cancels the worker job,
and checks the night still ends with the same report, nothing published built again, no lock and no job
left.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.artifacts import MANIFEST, ArtifactStore
from pipeline.experiments import Experiment
from pipeline.config import SlurmConfig
from pipeline.faults import FAULT_ENV, FAULT_ONCE_ENV
from pipeline.slurm import Driver, Node, _replace_lost_jobs, driver_allocation, fit_problem
from tests.faults_util import REPO, TINY
from tests.slurm_cluster import PARTITION, Slurm, Unavailable, one_node_slurm

SBATCH = REPO / "scripts" / "nightly.sbatch"
FREEZE = "probe:start:1:STOP"  # the worker stops itself as probe begins (its lock held, tokens published)
EXPERIMENT = {"experiment": "tiny-slurm", "overrides": [o for o in TINY if not o.startswith("run.")] + ["probe.steps=5"],
              "matrix": [{"projection.method": ["identity"]}], "targets": ["evaluate"], "collect": "report"}
ARTIFACTS = 8  # synthesize, prepare and extract of train and val, probe, evaluate, report


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    try:
        with one_node_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except Unavailable as exc:
        pytest.skip(f"no one-node SLURM on this machine: {exc}")


@dataclass
class Night:
    """One submission of the nightly script: its folder (experiment file, artifact root, logs) and job."""

    slurm: Slurm
    dir: Path
    job: str = ""

    @property
    def root(self) -> Path:
        return self.dir / "artifacts"

    @property
    def experiment(self) -> Path:
        return self.dir / "tiny-slurm.yaml"

    def log(self) -> str:
        path = self.dir / "logs" / f"driver-{self.job}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.dir / "logs").glob("*-*.*"))) + "\n" + self.slurm.logs()

    def submit(self, *, cpus: int = 1, worker_cores: int = 1, freeze: bool = False) -> str:
        """``sbatch scripts/nightly.sbatch`` with the one-node settings docs/batch.md shows."""
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.experiment.write_text(json.dumps(EXPERIMENT))  # JSON is YAML
        export = {"EXPERIMENT": str(self.experiment), "STEGOPIPE_ROOT": str(self.root), "DEVICE": "cpu",
                  "WORKER_PARTITION": PARTITION, "WORKER_ACCOUNT": "none", "WORKER_JOBS": "1",
                  "WORKER_CORES": str(worker_cores), "WORKER_MEMORY": "3GB", "WORKER_GPUS": "0", "GRACE_S": "60",
                  "WORKER_LOG_DIR": str(self.dir / "logs"),
                  "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                  # dask-jobqueue drops a lost worker job after this (default 15 s); the driver then replaces it
                  "DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "3s"}
        if freeze:
            export.update({FAULT_ENV: FREEZE, FAULT_ONCE_ENV: str(self.dir / "frozen")})
        out = self.slurm.run(
            "sbatch", "--parsable", f"--partition={PARTITION}", "--account=none", f"--cpus-per-task={cpus}",
            "--mem=3G", f"--output={self.dir / 'logs' / 'driver-%j.log'}",
            "--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items()), str(SBATCH), cwd=REPO)
        self.job = out.strip().split(";")[0]
        return self.job

    def wait_for(self, what: str, done: callable, timeout_s: float = 240) -> None:  # type: ignore[valid-type]
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}\n{self.logs()}"
            time.sleep(1)

    def finish(self, runs: int = 1) -> str:
        """Wait until stegopipe has exited ``runs`` times in the driver job and no job is left; the log."""
        self.wait_for(f"{runs} driver run(s)", lambda: self.log().count("stegopipe exited with status") >= runs)
        self.wait_for("an empty squeue", lambda: not self.slurm.jobs(), 90)
        return self.log()

    def worker_jobs(self) -> list[str]:
        return [j["id"] for j in self.slurm.jobs() if j["name"] == "dask-worker"]

    def published(self) -> dict[str, bytes]:
        """Every published artifact's manifest bytes, by id."""
        return {p.parent.name: p.read_bytes() for p in self.root.glob(f"*/*/{MANIFEST}")}


def planned_report(night: Night) -> str:
    """The report id a local run of the experiment builds (ids do not depend on where stages run)."""
    _, targets = Experiment.load(str(night.experiment)).plan([f"run.root={night.root}", "run.executor=local"])
    return targets[0]


def reported(log: str) -> str:
    """The report folder the (last) run printed."""
    return Path(re.findall(r"^(/\S+/report/report-[0-9a-f]{16})$", log, re.M)[-1]).name


def assert_finished_cleanly(night: Night, log: str) -> None:
    assert log.rstrip().endswith("stegopipe exited with status 0"), night.logs()
    assert reported(log) == planned_report(night)
    assert ArtifactStore(night.root).path(reported(log)).is_dir()
    assert not list((night.root / ".locks").glob("*.lock")), night.logs()
    assert not night.slurm.jobs()


@pytest.mark.slurm
def test_nightly_script_runs_an_experiment_on_worker_jobs(slurm: Slurm, tmp_path: Path) -> None:
    """sbatch nightly.sbatch: the driver submits a worker job, every stage runs there, the report id is the
    one a local run builds, and the worker job is gone afterwards."""
    night = Night(slurm, tmp_path)
    night.submit()
    night.wait_for("a worker job", lambda: bool(night.worker_jobs()) or "exited" in night.log())
    log = night.finish()
    assert_finished_cleanly(night, log)
    assert f"({ARTIFACTS} built, 0 cached)" in log and log.count("[done] ") == ARTIFACTS
    workers = list((night.dir / "logs").glob("dask-worker-*.err"))  # run.slurm.log_directory (WORKER_LOG_DIR)
    assert len(workers) == 1 and "Starting Worker" in workers[0].read_text(), night.logs()


@pytest.mark.slurm
def test_a_requeued_driver_resumes_from_the_cache(slurm: Slurm, tmp_path: Path) -> None:
    """The driver job is requeued twice while the worker is inside probe: first by ``scontrol requeue``
    (SLURM sends TERM to the job; stegopipe unwinds and cancels its worker job), then by the script's own
    time-limit path (USR1 to the batch shell, as ``--signal=B:USR1@300`` sends it; the script then calls
    ``scontrol requeue``). Each stop exits non-zero, the last run finishes with the same report, and what was
    published before a stop is a cache hit afterwards, untouched."""
    night = Night(slurm, tmp_path)
    job = night.submit(freeze=True)
    frozen = tmp_path / "frozen"
    before = {}
    for restart, stop in enumerate([("scontrol", "requeue", job), ("scancel", "--signal=USR1", "--batch", job)]):
        night.wait_for("the worker to freeze in probe", frozen.exists)
        before = night.published()
        assert len(before) >= 3 and not any(a.startswith("probe-") for a in before), sorted(before)
        slurm.run(*stop)
        night.wait_for("stegopipe to stop", lambda: night.log().count("stegopipe exited with status") > restart, 60)
        if restart == 0:
            frozen.unlink()  # the first requeued run's worker freezes again at the same point
    log = night.finish(runs=3)
    first, second, third = re.split(r"\(restart [12]\)", log)
    stopped = re.compile(r"stegopipe exited with status [1-9]")  # an interrupted run is no success
    assert "preempted or cancelled" in first and stopped.search(first), night.logs()
    assert "time limit in 5 minutes" in second and stopped.search(second), night.logs()
    assert f"requeueing job {job}" in second
    assert_finished_cleanly(night, log)
    after = night.published()
    assert all(after[a] == before[a] for a in before)  # not rebuilt: same manifests, same files
    assert all(f"[hit] {a}" in third and f"[done] {a}" not in third for a in before), third
    assert f"({ARTIFACTS - len(before)} built, {len(before)} cached)" in third


@pytest.mark.slurm
def test_a_cancelled_worker_job_is_replaced(slurm: Slurm, tmp_path: Path) -> None:
    """``scancel`` of the worker job while its stage runs: the driver names the lost job, submits a new one,
    and the night finishes with the same report; no lock and no job left."""
    night = Night(slurm, tmp_path)
    night.submit(freeze=True)
    night.wait_for("the worker to freeze in probe", (tmp_path / "frozen").exists)
    [lost] = night.worker_jobs()
    slurm.run("scancel", lost)
    log = night.finish()
    assert f"worker job {lost} ended before the run did" in log, night.logs()
    assert_finished_cleanly(night, log)
    assert len(list((night.dir / "logs").glob("dask-worker-*.err"))) == 2


@pytest.mark.slurm
def test_a_worker_that_cannot_fit_next_to_the_driver_is_refused_before_submitting(slurm: Slurm,
                                                                                  tmp_path: Path) -> None:
    """A driver holding every CPU of the one node, and a worker job that needs one more: one error line
    naming the sizes, no worker job submitted, instead of a night that waits for ever."""
    cpus = int(slurm.run("sinfo", "--noheader", "--format=%c").split()[0])
    night = Night(slurm, tmp_path)
    night.submit(cpus=cpus)
    log = night.finish()
    assert "stegopipe exited with status 2" in log, night.logs()
    [line] = [line for line in log.splitlines() if line.startswith("error:")]
    assert f"fits on no node of partition '{PARTITION}'" in line and f"driver job {night.job} holds {cpus} CPUs" in line
    assert not list((night.dir / "logs").glob("dask-worker-*"))


def test_a_worker_job_must_fit_next_to_the_driver() -> None:
    node = Node("n1", cpus=2, memory_mb=24000, gpus=0)
    worker = SlurmConfig(queue="debug", cores=1, memory="3GB")
    assert fit_problem(worker, [node], Driver("7", "n1", cpus=1, memory_mb=3072)) is None
    assert fit_problem(worker, [node], None) is None
    problem = fit_problem(worker, [node], Driver("7", "n1", cpus=2, memory_mb=3072))
    assert problem and "fits on no node of partition 'debug'" in problem and "driver job 7 holds 2 CPUs" in problem
    assert fit_problem(worker, [node, Node("n2", 2, 24000, 0)], Driver("7", "n1", 2, 3072)) is None  # room on n2
    assert fit_problem(SlurmConfig(cores=1, memory="30GB"), [node], None)  # memory
    assert fit_problem(SlurmConfig(cores=1, memory="30GB"), [Node("n1", 2, 1, 0)], None) is None  # memory untracked
    assert fit_problem(SlurmConfig(cores=1, memory="3GB", gpus_per_job=1), [node], None)  # no GPU
    assert fit_problem(worker, [], None) == "run.slurm.queue: partition 'debug' has no nodes"


def test_the_driver_allocation_comes_from_the_job_environment() -> None:
    env = {"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1", "SLURM_CPUS_ON_NODE": "2", "SLURM_MEM_PER_CPU": "1000"}
    assert driver_allocation(env) == Driver("12", "n1", 2, 2000)
    assert driver_allocation({**env, "SLURM_MEM_PER_NODE": "3072"}) == Driver("12", "n1", 2, 3072)
    assert driver_allocation({}) is None


class _Job:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class _Cluster:
    """What _replace_lost_jobs reads of a dask-jobqueue cluster: the planned workers and their live jobs."""

    def __init__(self) -> None:
        self.worker_spec = {"w0": {}, "w1": {}}
        self.workers = {"w0": _Job("41"), "w1": _Job("42")}
        self.scaled: list[int] = []

    def scale(self, jobs: int) -> None:
        self.scaled.append(jobs)


def test_a_lost_worker_job_is_named_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    cluster, seen = _Cluster(), {}
    _replace_lost_jobs(cluster, 2, seen)
    assert cluster.scaled == [] and not caplog.records
    del cluster.workers["w1"]  # dask-jobqueue dropped job 42 (cancelled)
    _replace_lost_jobs(cluster, 2, seen)
    assert cluster.scaled == [2]
    assert [r.getMessage() for r in caplog.records] == [
        "worker job 42 ended before the run did (cancelled, failed or out of time); submitting a new one"]
    _replace_lost_jobs(cluster, 2, seen)  # once: the replacement is being submitted
    assert cluster.scaled == [2] and len(caplog.records) == 1
    cluster.workers["w1"] = _Job("43")
    _replace_lost_jobs(cluster, 2, seen)
    assert cluster.scaled == [2] and seen == {"w0": "41", "w1": "43"}
