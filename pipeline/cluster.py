"""Dask clients: a LocalCluster, an existing scheduler, or SLURM through dask-jobqueue (:func:`dask_client`),
and the client sharded work fans out to (:func:`shard_client`)."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig

from pipeline.environment import resolve_device
from pipeline.errors import ConfigError

log = logging.getLogger("stegopipe")


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
        from pipeline.slurm import slurm_cluster

        with slurm_cluster(run_cfg.slurm) as cluster, Client(cluster) as client:
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
