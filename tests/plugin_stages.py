"""Toy stages for framework tests (registered with STEGOPIPE_PLUGINS=stages.plugin,tests.plugin_stages).

Each stage appends a line to ``toy.log`` (the number of computations is observable), optionally
sleeps (to be killed or to overlap), and writes ``out.json``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import register_section, setting
from pipeline.context import StageContext
from pipeline.params import Exclude, Params
from pipeline.planner import Request
from pipeline.registry import register_stage
from pipeline.specs import register_spec_dir

register_spec_dir(Path(__file__).resolve().parent / "specs")


@dataclass
class ToyConfig:
    value: int = 1
    sleep: float = setting(0.0, runtime=True)
    log: str = setting("", runtime=True)  # file that records every computation: "<stage> <start> <end> <pid> <met>"
    meet: str = setting("", runtime=True)  # folder where the two branches wait (up to 60 s) for each other
    scale: float = 1.0


register_section("toy", ToyConfig)


def _meet(folder: str, stage: str) -> bool:
    """Whether the other branch was running at the same time: each branch marks its start in ``folder`` and
    waits up to 60 s for the other's mark (an overlap shown by rendezvous, not by timing)."""
    Path(folder, stage).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).iterdir())) < 2:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _work(ctx: StageContext, value: Any, *, branch: bool = False) -> None:
    start = time.time()
    if value < 0:
        raise ValueError("negative toy value")
    (ctx.out / "partial.txt").write_text("half")  # a file that exists before the stage is complete
    met = _meet(ctx.runtime.toy.meet, ctx.task.stage) if branch and ctx.runtime.toy.meet else None
    time.sleep(ctx.runtime.toy.sleep)
    (ctx.out / "out.json").write_text(json.dumps({"value": value, "pid": os.getpid()}))
    if ctx.runtime.toy.log:
        with open(ctx.runtime.toy.log, "a") as handle:
            handle.write(f"{ctx.task.stage} {start} {time.time()} {os.getpid()} {met}\n")
    ctx.record(counts={"value": value})


@register_stage("t_source", kind="toy", sections=("toy",))
def t_source(ctx: StageContext) -> None:
    """Toy source stage."""
    _work(ctx, ctx.config.toy.value)


def _branch_inputs(cfg: Any, args: dict[str, Any]) -> dict[str, Request]:
    return {"source": Request("t_source", cfg)}


@register_stage("t_left", kind="toy", sections=("toy",), inputs=_branch_inputs)
def t_left(ctx: StageContext) -> None:
    """Toy branch A."""
    _work(ctx, ctx.config.toy.value * 2, branch=True)


@register_stage("t_right", kind="toy", sections=("toy",), inputs=_branch_inputs)
def t_right(ctx: StageContext) -> None:
    """Toy branch B."""
    _work(ctx, ctx.config.toy.value * 3, branch=True)


def _join_inputs(cfg: Any, args: dict[str, Any]) -> dict[str, Request]:
    return {"left": Request("t_left", cfg), "right": Request("t_right", cfg)}


@register_stage("t_join", kind="toy", sections=("toy",), inputs=_join_inputs,
                params=Params(exclude=(Exclude(("toy.*",), "a join only sums its inputs"),)))
def t_join(ctx: StageContext) -> None:
    """Toy join: sums its inputs."""
    total = sum(json.loads((ctx.input(n).path / "out.json").read_text())["value"] for n in ("left", "right"))
    _work(ctx, total)


@register_stage("t_shards", kind="toy", sections=("toy",), resumable=True)
def t_shards(ctx: StageContext) -> None:
    """Toy resumable stage: 6 shards, each sleeps then writes a file."""
    for key in ctx.shards([f"{i:03d}" for i in range(6)]):
        time.sleep(ctx.runtime.toy.sleep)
        (ctx.out / f"shard-{key}.txt").write_text(key)
        ctx.shard_finished(key)
    (ctx.out / "out.json").write_text(json.dumps({"value": len(list(ctx.out.glob('shard-*.txt')))}))


@register_stage("t_bars", kind="toy", sections=("toy",))
def t_bars(ctx: StageContext) -> None:
    """Toy stage with a progress bar: 20 steps over ``toy.sleep`` seconds."""
    from tqdm import tqdm

    for _ in tqdm(range(20), desc="toy", unit="step"):
        time.sleep(ctx.runtime.toy.sleep / 20)
    (ctx.out / "out.json").write_text(json.dumps({"value": 20}))
