"""Dask worker jobs on SLURM through dask-jobqueue (``run.cluster=slurm``, ``run.slurm.*``).

Two things dask-jobqueue does not do for a batch run:

- **Sizing.** Before any worker job is submitted, :func:`fit_problem` checks that one worker job fits on
  some node of its partition next to the driver job this process runs in (a 2-core node holding a 2-CPU
  driver can never start a 1-core worker); if none does, the run stops with one line instead of waiting for
  ever.
- **Lost worker jobs.** A worker job that ends early (``scancel``, a failed node, its time limit) is dropped
  by dask-jobqueue but not replaced, so the tasks it held would wait for ever. :func:`slurm_cluster` checks
  every few seconds and submits a new job for each lost one, naming the lost job in a warning; the stage it
  was running starts again on the new worker (its lock is stale once its process is gone).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger("stegopipe")

WATCH_INTERVAL_MS = 3000


@dataclass(frozen=True)
class Node:
    """A node of a partition as ``sinfo`` reports it (``memory_mb`` 1 when the site does not track memory)."""

    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Driver:
    """This process's own job allocation on its node (from the job's environment)."""

    job_id: str
    node: str
    cpus: int
    memory_mb: int


def partition_nodes(queue: str | None) -> list[Node] | None:
    """The nodes of partition ``queue`` (None: the default partition); None when ``sinfo`` is missing."""
    if not shutil.which("sinfo"):
        return None
    args = ["sinfo", "--noheader", "--Node", "--format=%N|%c|%m|%G|%P"]
    done = subprocess.run(args + ([f"--partition={queue}"] if queue else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"run.slurm.queue={queue!r}: sinfo failed: {done.stderr.strip()}")
    nodes = []
    for line in done.stdout.splitlines():
        name, cpus, memory, gres, partition = line.strip().split("|")
        if queue or partition.endswith("*"):
            gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:(,]+)?:(\d+)", gres))
            nodes.append(Node(name, int(cpus), int(memory.rstrip("+")), gpus))
    return nodes


def driver_allocation(env: dict[str, str] | None = None) -> Driver | None:
    """The job this process runs in (None outside a SLURM job)."""
    env = dict(os.environ) if env is None else env
    if not env.get("SLURM_JOB_ID") or not env.get("SLURMD_NODENAME"):
        return None
    cpus = int(env.get("SLURM_CPUS_ON_NODE", "1"))
    memory = int(env.get("SLURM_MEM_PER_NODE") or int(env.get("SLURM_MEM_PER_CPU", "0")) * cpus)
    return Driver(env["SLURM_JOB_ID"], env["SLURMD_NODENAME"], cpus, memory)


def memory_mb(memory: str) -> int:
    """``run.slurm.memory`` ("64GB", "3GiB") in MiB, rounded up, as SLURM's ``--mem`` counts it."""
    from dask.utils import parse_bytes

    return math.ceil(parse_bytes(memory) / 2**20)


def fit_problem(slurm: Any, nodes: list[Node], driver: Driver | None) -> str | None:
    """Why no worker job of ``slurm`` (cores, memory, gpus_per_job, queue) can ever start on ``nodes``
    next to ``driver``; None when one fits on some node."""
    need_mb = memory_mb(slurm.memory)
    where = f"partition {slurm.queue!r}" if slurm.queue else "the default partition"
    if not nodes:
        return f"run.slurm.queue: {where} has no nodes"
    sizes = []
    for node in nodes:
        taken = driver if driver is not None and driver.node == node.name else None
        cpus = node.cpus - (taken.cpus if taken else 0)
        memory = node.memory_mb - (taken.memory_mb if taken else 0)
        if cpus >= slurm.cores and (node.memory_mb <= 1 or memory >= need_mb) and node.gpus >= slurm.gpus_per_job:
            return None
        sizes.append(f"{node.name}: {node.cpus} CPUs, {node.memory_mb} MB, {node.gpus} GPUs"
                     + (f", of which driver job {taken.job_id} holds {taken.cpus} CPUs, {taken.memory_mb} MB"
                        if taken else ""))
    return (f"run.slurm: a worker job ({slurm.cores} cores, {slurm.memory}, {slurm.gpus_per_job} GPUs) fits on no "
            f"node of {where} ({'; '.join(sizes)}), so it would wait for ever. Ask for less per worker "
            "(run.slurm.cores, run.slurm.memory), another partition (run.slurm.queue), or give the driver job "
            "fewer CPUs or less memory (sbatch --cpus-per-task, --mem)")


def check_fit(slurm: Any) -> None:
    """Raise :class:`ConfigError` when no worker job can start (see :func:`fit_problem`); a machine
    without ``sinfo`` is not checked (dask-jobqueue's ``sbatch`` will say what is wrong)."""
    nodes = partition_nodes(slurm.queue)
    if nodes is not None:
        problem = fit_problem(slurm, nodes, driver_allocation())
        if problem:
            raise ConfigError(problem)


def _replace_lost_jobs(cluster: Any, jobs: int, seen: dict[str, str]) -> None:
    """On the cluster's event loop: submit a new worker job for each one dask-jobqueue has dropped."""
    for name, job in list(cluster.workers.items()):
        if getattr(job, "job_id", None):
            seen[name] = job.job_id
    lost = [name for name in cluster.worker_spec if name not in cluster.workers and name in seen]
    if lost:
        log.warning("worker job %s ended before the run did (cancelled, failed or out of time); "
                    "submitting a new one", ", ".join(seen.pop(name) for name in lost))
        cluster.scale(jobs=jobs)


@contextlib.contextmanager
def slurm_cluster(slurm: Any) -> Iterator[Any]:
    """A dask-jobqueue ``SLURMCluster`` with ``slurm.jobs`` worker jobs that are replaced when lost;
    raises :class:`ConfigError` before submitting any when a worker job cannot fit (see :func:`check_fit`)."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ConfigError("run.cluster=slurm needs dask-jobqueue: pip install 'stegopipe[slurm]'") from exc
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, sigint)  # importing dask_jobqueue makes Ctrl-C exit with status 0
    from tornado.ioloop import PeriodicCallback

    check_fit(slurm)
    extra = list(slurm.job_extra_directives) + ([f"--gres=gpu:{slurm.gpus_per_job}"] if slurm.gpus_per_job else [])
    worker_extra = ["--resources", f"GPU={slurm.gpus_per_job}"] if slurm.gpus_per_job else []
    with SLURMCluster(queue=slurm.queue, account=slurm.account, cores=slurm.cores, memory=slurm.memory,
                      walltime=slurm.walltime, job_extra_directives=extra, worker_extra_args=worker_extra,
                      local_directory=slurm.local_directory, log_directory=slurm.log_directory) as cluster:
        cluster.scale(jobs=slurm.jobs)
        seen: dict[str, str] = {}
        watch = PeriodicCallback(lambda: _replace_lost_jobs(cluster, slurm.jobs, seen), WATCH_INTERVAL_MS)
        cluster.loop.add_callback(watch.start)
        try:
            yield cluster
        finally:
            cluster.loop.add_callback(watch.stop)
