"""extract fault tests: a failed or kill -9'd run resumes per shard and ends bit-identical."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import stages.store as store_module
from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.executor import TaskResult
from pipeline.faults import FAULT_ENV
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
from stages.store import TOKENS_STORE
from tests.conftest import cli_process

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]

SMALL = ["dataset.synthetic.n_train=7", "dataset.synthetic.height=40", "dataset.synthetic.width=48",
         "backbone.name=vit_small_patch16_224.dino", "extract.train_res=32", "extract.shard_size=2",
         "extract.batch_size=2"]
# 6 shards; the CLI child kills itself after the third marker
KILLED = ["dataset.synthetic.n_train=24", "dataset.synthetic.height=40", "dataset.synthetic.width=48",
          "backbone.name=vit_small_patch16_224.dino", "extract.train_res=64", "extract.shard_size=4",
          "extract.batch_size=4", "extract.loader_workers=1"]


def run_extract(overrides: list[str], stage: str = "extract") -> TaskResult:
    cfg = load_config(None, ["run.executor=local", *overrides])
    tasks, targets = plan([Request(stage, cfg, {"split": "train"})])
    return {r.id: r for r in run_tasks(tasks, cfg.run)}[targets[0]]


def store_files(artifact: Path) -> dict[str, bytes]:
    base = artifact / TOKENS_STORE
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_failed_run_publishes_nothing_and_the_rerun_reuses_written_shards(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = store_module.write_shard

    def failing_write(store: object, shard: int, **arrays: object) -> None:
        if shard == 2:
            raise OSError("disk full (injected)")
        real_write(store, shard, **arrays)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "write_shard", failing_write)
    with pytest.raises(StageError, match="disk full"):
        run_extract(SMALL)
    assert ArtifactStore(root).ids("extract") == []
    monkeypatch.setattr(store_module, "write_shard", real_write)
    resumed = run_extract(SMALL)
    manifest = json.loads((resumed.path / "manifest.json").read_text())
    assert manifest["shards"] == {"computed": 2, "reused": 2}  # shards 0 and 1 were written before the failure
    assert manifest["counts"]["samples_computed"] == 3

    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "fresh"))
    fresh = run_extract(SMALL)
    assert fresh.id == resumed.id and store_files(fresh.path) == store_files(resumed.path)


@pytest.mark.faults_full
def test_kill_9_then_rerun_is_bit_identical_to_an_uninterrupted_run(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_extract(KILLED, stage="prepare")  # in-process, so the subprocess starts extracting at once
    proc = cli_process("run", "extract", *KILLED, env={**os.environ, FAULT_ENV: "extract:shard:3"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL  # it killed itself after its third shard marker
    done_at_kill = len(list((root / ".staging").glob("extract-*/.shards/*.done")))
    assert ArtifactStore(root).ids("extract") == [] and done_at_kill == 3

    again = cli_process("run", "extract", *KILLED)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    resumed = Path(out.strip().splitlines()[-1])
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["shards"] == {"computed": 3, "reused": 3}

    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "uninterrupted"))
    reference = run_extract(KILLED)
    assert reference.path.name == resumed.name
    assert store_files(reference.path) == store_files(resumed)
