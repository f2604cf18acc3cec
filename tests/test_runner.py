"""Runner: skip-if-done, new ids on change, crash safety, one writer, Dask parallelism, resume."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import MissingArtifactError, StageError
from pipeline.runner import Request, plan, run_tasks
from tests.conftest import cli_process


def _run(stage: str, overrides: list[str], **kwargs: object) -> list:
    cfg = load_config(None, overrides)
    tasks, _ = plan([Request(stage, cfg)])
    return run_tasks(tasks, cfg.run, **kwargs)  # type: ignore[arg-type]


def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_same_params_hit_the_cache_and_changed_params_make_a_new_id(toy: Path, tmp_path: Path) -> None:
    log = tmp_path / "toy.log"
    first = _run("t_join", [f"toy.log={log}", "run.executor=local"])
    assert [r.status for r in first] == ["ran"] * 4 and len(_log_lines(log)) == 4
    second = _run("t_join", [f"toy.log={log}", "run.executor=local"])
    assert [r.status for r in second] == ["hit"] * 4
    assert len(_log_lines(log)) == 4  # the second run did no work
    assert [r.id for r in first] == [r.id for r in second]
    third = _run("t_join", [f"toy.log={log}", "toy.value=2", "run.executor=local"])
    assert {r.id for r in third}.isdisjoint({r.id for r in first})
    assert json.loads((third[-1].path / "out.json").read_text())["value"] == 10
    # worker-only settings do not change ids
    assert [r.id for r in _run("t_join", [f"toy.log={log}", "toy.sleep=0.01", "run.executor=local"])] == \
        [r.id for r in first]


def test_failed_stage_publishes_nothing(toy: Path) -> None:
    with pytest.raises(StageError, match="t_source.*negative toy value"):
        _run("t_source", ["toy.value=-1", "run.executor=local"])
    assert ArtifactStore(toy).ids() == []


def test_missing_upstream_names_the_make_target(toy: Path) -> None:
    cfg = load_config(None, ["run.executor=local"])
    tasks, targets = plan([Request("t_left", cfg)])
    with pytest.raises(MissingArtifactError, match="make t_source"):
        run_tasks(tasks, cfg.run, only=set(targets))


def test_kill_9_before_the_manifest_leaves_no_artifact(toy: Path, tmp_path: Path) -> None:
    log = tmp_path / "toy.log"
    proc = cli_process("run", "t_source", "toy.sleep=30", f"toy.log={log}")
    store = ArtifactStore(toy)
    deadline = time.time() + 60
    while not list((toy / ".staging").glob("*/partial.txt")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.ids() == []  # half-written work is invisible
    again = cli_process("run", "t_source", f"toy.log={log}")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert store.ids() and json.loads((Path(out.strip()) / "out.json").read_text())["value"] == 1
    assert store.verify(store.ids()[0]) == []


def test_two_processes_same_stage_compute_once(toy: Path, tmp_path: Path) -> None:
    log = tmp_path / "toy.log"
    procs = [cli_process("run", "t_source", "toy.sleep=1.5", f"toy.log={log}") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0].strip() == outs[1][0].strip()  # both see the same artifact
    assert len(_log_lines(log)) == 1  # exactly one computed it


def test_dask_runs_independent_stages_in_parallel_and_respects_dependencies(toy: Path, tmp_path: Path) -> None:
    log = tmp_path / "toy.log"
    results = _run("t_join", [f"toy.log={log}", "toy.sleep=3.0", "run.executor=dask", "run.workers=2"])
    assert [r.status for r in results] == ["ran"] * 4
    spans = {line.split()[0]: (float(line.split()[1]), float(line.split()[2]), line.split()[3])
             for line in _log_lines(log)}
    (ls, le, lpid), (rs, re_, rpid) = spans["t_left"], spans["t_right"]
    assert ls < re_ and rs < le, "left and right did not overlap"
    assert lpid != rpid
    assert spans["t_source"][1] <= min(ls, rs)
    assert spans["t_join"][0] >= max(le, re_)


def test_resumable_stage_reuses_finished_shards_after_kill(toy: Path, tmp_path: Path) -> None:
    proc = cli_process("run", "t_shards", "toy.sleep=0.4")
    deadline = time.time() + 60
    while len(list((toy / ".staging").glob("*/.shards/*.done"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    results = _run("t_shards", ["run.executor=local"])
    manifest = ArtifactStore(toy).manifest(results[0].id)
    assert manifest["shards"]["reused"] >= 2
    assert manifest["shards"]["reused"] + manifest["shards"]["computed"] == 6
    assert json.loads((results[0].path / "out.json").read_text())["value"] == 6


def test_plan_deduplicates_shared_upstream(toy: Path) -> None:
    cfg = load_config(None, [])
    tasks, targets = plan([Request("t_left", cfg), Request("t_right", cfg), Request("t_join", cfg)])
    assert [t.stage for t in tasks].count("t_source") == 1 and len(tasks) == 4
    assert OmegaConf.create(tasks[0].cfg).toy.value == 1 and len(set(targets)) == 3
