"""Runner: skip-if-done, new ids on change, crash safety, one writer, Dask parallelism, resume."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import MissingArtifactError, StageError
from pipeline.context import StageContext
from pipeline.faults import FAULT_ENV
from pipeline.planner import Request, plan
from pipeline.registry import register_stage
from pipeline.runner import RemoteFailure, _execute_remote, run_tasks
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
    with pytest.raises(MissingArtifactError, match="is missing .*removed by `stegopipe gc`.*make t_source"):
        run_tasks(tasks, cfg.run, only=set(targets))


def _killed_at(fault: str) -> dict[str, str]:
    """The environment of a CLI child that SIGKILLs itself at ``fault`` (the runner's test hook)."""
    return {**os.environ, FAULT_ENV: fault}


def test_kill_9_before_the_manifest_leaves_no_artifact(toy: Path, tmp_path: Path) -> None:
    log = tmp_path / "toy.log"
    proc = cli_process("run", "t_source", f"toy.log={log}", env=_killed_at("t_source:publish:1"))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    store = ArtifactStore(toy)
    assert list((toy / ".staging").glob("*/out.json"))  # every file written, then killed before the manifest
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
    log, meet = tmp_path / "toy.log", tmp_path / "meet"
    meet.mkdir()
    results = _run("t_join", [f"toy.log={log}", f"toy.meet={meet}", "run.executor=dask", "run.workers=2"])
    assert [r.status for r in results] == ["ran"] * 4
    spans = {line.split()[0]: (float(line.split()[1]), float(line.split()[2]), line.split()[3], line.split()[4])
             for line in _log_lines(log)}
    (ls, le, lpid, lmet), (rs, re_, rpid, rmet) = spans["t_left"], spans["t_right"]
    assert lmet == rmet == "True", "left and right did not run at the same time"  # each waited for the other
    assert lpid != rpid
    assert spans["t_source"][1] <= min(ls, rs)
    assert spans["t_join"][0] >= max(le, re_)


def test_resumable_stage_reuses_finished_shards_after_kill(toy: Path, tmp_path: Path) -> None:
    proc = cli_process("run", "t_shards", env=_killed_at("t_shards:shard:2"))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(list((toy / ".staging").glob("*/.shards/*.done"))) == 2
    results = _run("t_shards", ["run.executor=local"])
    manifest = ArtifactStore(toy).manifest(results[0].id)
    assert manifest["shards"] == {"computed": 4, "reused": 2}
    assert json.loads((results[0].path / "out.json").read_text())["value"] == 6


def test_plan_deduplicates_shared_upstream(toy: Path) -> None:
    cfg = load_config(None, [])
    tasks, targets = plan([Request("t_left", cfg), Request("t_right", cfg), Request("t_join", cfg)])
    assert [t.stage for t in tasks].count("t_source") == 1 and len(tasks) == 4
    assert OmegaConf.create(tasks[0].cfg).toy.value == 1 and len(set(targets)) == 3


def test_a_half_deleted_artifact_is_rebuilt_not_a_cache_hit(toy: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "toy.log"
    first = _run("t_left", [f"toy.log={log}", "run.executor=local"])
    source = first[0].path
    (source / "out.json").unlink()  # what a gc killed mid-way by an older version left: manifest, no files
    with caplog.at_level(logging.WARNING, logger="stegopipe"):
        again = _run("t_left", [f"toy.log={log}", "run.executor=local"])
    assert [r.status for r in again] == ["ran", "hit"] and len(_log_lines(log)) == 3
    assert any(first[0].id in r.getMessage() and "out.json" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert ArtifactStore(toy).verify(first[0].id) == []
    assert not list((toy / ".trash").iterdir())  # the broken one was replaced, not kept


def test_gc_keeps_the_inputs_of_a_running_stage(toy: Path, tmp_path: Path) -> None:
    source = _run("t_source", ["run.executor=local"])[0]
    proc = cli_process("run", "t_left", "toy.sleep=30")
    store = ArtifactStore(toy)
    try:
        deadline = time.time() + 60
        while not list((toy / ".staging").glob("t_left-*/partial.txt")) and time.time() < deadline:
            time.sleep(0.1)
        report = store.gc(set(), dry_run=False)
        assert store.exists(source.id) and source.id in report.in_use
        assert report.artifacts == [] and report.staging == []  # the running stage's staging folder stays
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    report = store.gc(set(), dry_run=False)  # the run is dead now: its staging folder and input go
    assert report.artifacts == [source.id] and len(report.staging) == 1 and report.bytes > 0


@register_stage("t_vanish", kind="toy",
                inputs=lambda cfg, args: {"source": Request("t_source", cfg)})
def _t_vanish(ctx: StageContext) -> None:
    """Toy stage whose input is deleted while it runs (as a gc of an older version did)."""
    shutil.rmtree(ctx.input("source").path)
    (ctx.input("source").path / "out.json").read_text()


@register_stage("t_returns", kind="toy")
def _t_returns(ctx: StageContext) -> dict:
    """Toy stage that returns manifest fields instead of recording them."""
    (ctx.out / "out.json").write_text(json.dumps({"value": 1}))
    return {"counts": {"value": 1}}


def test_manifest_fields_come_only_from_ctx_record(toy: Path) -> None:
    with pytest.raises(StageError, match=r"stage t_returns returned a value; .*ctx\.record"):
        _run("t_returns", ["run.executor=local"])
    assert ArtifactStore(toy).ids("t_returns") == []
    (source,) = _run("t_source", ["run.executor=local"])
    assert ArtifactStore(toy).manifest(source.id)["counts"] == {"value": 1}


def test_an_input_that_vanishes_is_named_with_its_make_target(toy: Path) -> None:
    with pytest.raises(MissingArtifactError, match=r"input artifact 'source' \(t_source-[0-9a-f]+\) disappeared "
                       r"while the stage ran.*stegopipe gc.*make t_source"):
        _run("t_vanish", ["run.executor=local"])


def test_worker_failures_are_one_line_without_worker_tracebacks(toy: Path) -> None:
    proc = cli_process("run", "t_join", "toy.value=-1", "--executor", "dask", "--workers", "1")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    assert "Compute Failed" not in err and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "t_source" in errors[0] and "negative toy value" in errors[0]


def test_a_failing_remote_task_returns_its_error_and_traceback(toy: Path) -> None:
    cfg = load_config(None, ["toy.value=-1"])
    tasks, _ = plan([Request("t_source", cfg)])
    failure = _execute_remote(tasks[0], str(toy), ["tests.plugin_stages"], False, "cpu", None)
    assert isinstance(failure, RemoteFailure) and isinstance(failure.error, StageError)
    assert "negative toy value" in str(failure.error) and "ValueError" in failure.traceback  # for --debug
