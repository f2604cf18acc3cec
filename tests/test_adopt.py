"""stegopipe adopt (issue 18.4): a cached result whose stage's code changed but whose params and inputs did
not is recomputed on a seeded sample (or whole, when it was quick), compared byte for byte, and published
under the new id as hard links only when identical."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import fingerprint
from pipeline.adopt import adopt
from pipeline.artifacts import ArtifactStore, id_from_manifest
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.context import StageContext
from pipeline.planner import Request, plan
from pipeline.registry import STAGES
from pipeline.runner import run_tasks
from pipeline.why import Explainer


def _plan(stage: str, overrides: list[str] | None = None):
    cfg = load_config(None, ["run.executor=local", *(overrides or [])])
    tasks, _ = plan([Request(stage, cfg)])
    return cfg, tasks


def _built(stage: str) -> str:
    cfg, tasks = _plan(stage)
    return run_tasks(tasks, cfg.run)[-1].id


def test_a_no_op_code_change_is_adopted_after_a_sampled_check(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _built("t_shards")
    monkeypatch.setattr(fingerprint, "SCHEME", fingerprint.SCHEME + 100)  # every fingerprint changes, no code does
    _, tasks = _plan("t_shards")
    new = tasks[-1].id
    store = ArtifactStore(toy)
    assert new != old and not store.exists(new)
    assert Explainer(store).why(tasks[-1]) == "code changed: the fingerprint rules"

    [done] = adopt(store, tasks, full_below_s=-1)  # sample even this quick stage
    assert (done.status, done.source) == ("adopted", old), done.detail
    manifest = store.manifest(new)
    sampled = manifest["adopted"]["shards"]
    assert len(sampled) == 4 and sampled[-1] == "005" and manifest["adopted"]["from"] == old
    assert manifest["adopted"]["result"] == "files identical" and id_from_manifest(manifest) == new
    assert store.verify(new) == []
    for entry in manifest["files"]:  # a twin: the same inodes
        assert os.stat(store.path(new) / entry["path"]).st_ino == os.stat(store.path(old) / entry["path"]).st_ino
    assert adopt(ArtifactStore(toy), tasks)[0].status == "cached"  # done once


def _other_shards(ctx: StageContext) -> None:
    """t_shards with a changed shard body."""
    for key in ctx.shards([f"{i:03d}" for i in range(6)]):
        (ctx.out / f"shard-{key}.txt").write_text(key * 2)
        ctx.shard_finished(key)
    (ctx.out / "out.json").write_text(json.dumps({"value": len(list(ctx.out.glob('shard-*.txt')))}))


def test_changed_output_is_named_and_nothing_is_adopted(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _built("t_shards")
    monkeypatch.setitem(STAGES, "t_shards", dataclasses.replace(STAGES["t_shards"], run=_other_shards))
    cfg, tasks = _plan("t_shards")
    store = ArtifactStore(toy)
    assert tasks[-1].id != old
    assert Explainer(store).why(tasks[-1]).startswith("code changed: ")
    result = CliRunner().invoke(main, ["--quiet", "adopt", "t_shards", "--full-below-s", "-1"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"different {tasks[-1].id} from {old}: recomputed shards ") and "shard-005.txt" in line
    assert not store.exists(tasks[-1].id) and not list((toy / ".staging").glob("*.adopt"))


def test_a_long_unsharded_stage_is_refused_and_a_quick_one_checked_whole(toy: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    old = _built("t_source")
    monkeypatch.setattr(fingerprint, "SCHEME", fingerprint.SCHEME + 100)
    _, tasks = _plan("t_source")
    store = ArtifactStore(toy)
    [refused] = adopt(store, tasks, full_below_s=-1)
    assert refused.status == "refused" and "has no shards to sample" in refused.detail
    assert store.ids() == [old]
    [whole] = adopt(store, tasks)  # the same process: even the pid in out.json is the same
    assert whole.status == "adopted" and whole.detail == "verified on the whole stage, files identical"
    assert store.manifest(tasks[0].id)["adopted"]["shards"] is None


def test_a_downstream_artifact_is_matched_through_its_adopted_input(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, built = _plan("t_left")
    old_source, old_left = (r.id for r in run_tasks(built, cfg.run))
    monkeypatch.setattr(fingerprint, "SCHEME", fingerprint.SCHEME + 100)
    _, tasks = _plan("t_left")
    store = ArtifactStore(toy)
    done = adopt(store, tasks)  # in this process even the pid in out.json is the same
    assert [(d.status, d.source) for d in done] == [("adopted", old_source), ("adopted", old_left)]
    assert store.manifest(tasks[1].id)["inputs"] == {"source": tasks[0].id}  # the new input id
