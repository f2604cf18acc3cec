"""What a running stage sees (:class:`StageContext`): params, config view, inputs, a staging folder,
shard markers and the one fan-out of sharded work, and the manifest fields it records.

A running stage gets ``ctx.params``, ``ctx.config`` (the declared sections without runtime fields) and
``ctx.runtime`` (the runtime fields and ``run``), never the whole config. It writes its files into
``ctx.out``, adds manifest fields with ``ctx.record(...)`` (the one way) and returns None.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import ArtifactStore, Staging
from pipeline.cluster import shard_client
from pipeline.config import split_sections
from pipeline.errors import StageError
from pipeline.faults import fault_point
from pipeline.planner import Task
from pipeline.params import view
from pipeline.registry import get_stage, stage_config

log = logging.getLogger("stegopipe")


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
    sample: int | None = None  # `stegopipe adopt`: compute only this many seeded shards and the last one
    sampled: list[str] | None = None  # ... the shards chosen (in the stage's order)

    @property
    def params(self) -> dict[str, Any]:
        """The id params (what the artifact id was computed from)."""
        return self.task.params

    @property
    def args(self) -> dict[str, Any]:
        return self.task.args

    @property
    def config(self) -> DictConfig:
        """The id fields of the declared sections that the stage's params did not exclude (read-only; all
        of it is covered by the id, :mod:`pipeline.params`)."""
        return stage_config(get_stage(self.task.stage), self.task.cfg, self.task.args)

    @property
    def runtime(self) -> DictConfig:
        """The runtime-only fields of the declared sections, and ``run`` (none of it changes the id)."""
        return view(split_sections(OmegaConf.create(self.task.cfg), self.sections)[1])

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
        Under :attr:`sample` only the sampled shards are yielded.
        """
        for key in self._sampled(list(keys)):
            if self.staging.shard_done(key):
                self.shards_reused += 1
                continue
            yield key

    def _sampled(self, keys: list[str]) -> list[str]:
        """``keys`` as they are, or under :attr:`sample` those of them in the sample: ``sample`` keys drawn
        with a generator seeded by the artifact id, and the last key (chosen on the first call)."""
        if self.sample is None:
            return keys
        if self.sampled is None:
            rng = random.Random(self.task.id)
            chosen = set(rng.sample(keys[:-1], min(self.sample, max(len(keys) - 1, 0)))) | set(keys[-1:])
            self.sampled = [key for key in keys if key in chosen]
        return [key for key in keys if key in self.sampled]

    def shard_finished(self, key: str) -> None:
        self.staging.mark_shard_done(key)
        self.shards_computed += 1
        log.debug("shard %s of %s done", key, self.task.id)
        fault_point(self.task.stage, "shard")

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
        todo = {key: todo[key] for key in self._sampled(list(todo))}
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
