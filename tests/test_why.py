"""plan says why a missing artifact is built although its stage has cached ones, and flags cached ones built
under other versions of the numerics packages (issue 18.3, 18.5)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import fingerprint
from pipeline.artifacts import MANIFEST, ArtifactStore, seal_manifest
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.environment import NUMERIC_PACKAGES
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
from pipeline.why import Explainer, params_changes


def _plan(stage: str, overrides: list[str]):
    cfg = load_config(None, ["run.executor=local", *overrides])
    return cfg, plan([Request(stage, cfg)])[0]


def test_reasons_name_the_params_the_inputs_and_the_code(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, tasks = _plan("t_left", [])
    run_tasks(tasks, cfg.run)
    store = ArtifactStore(toy)
    _, changed = _plan("t_left", ["toy.value=2"])
    explain = Explainer(store)
    source, left = explain.why(changed[0]), explain.why(changed[1])
    assert source.startswith("params changed: ") and source.endswith("value 1 → 2")
    assert left.startswith(source + "; ") and left.endswith(f"; input changed: {changed[0].id} (source)")
    # the plan table shows it under the row
    result = CliRunner().invoke(main, ["--quiet", "plan", "t_left", "toy.value=2"], catch_exceptions=False)
    assert f"     why: {source}\n" in result.output
    monkeypatch.setattr(fingerprint, "SCHEME", fingerprint.SCHEME + 1)
    _, recoded = _plan("t_left", [])
    assert Explainer(store).why(recoded[0]) == "code changed: the fingerprint rules"


def test_params_changes_walk_nested_values() -> None:
    assert params_changes({"head": {"lr": 0.0005, "dim": 70}}, {"head": {"lr": 0.001, "dim": 70}}) == \
        ["head.lr 0.0005 → 0.001"]
    assert params_changes({"a": 1}, {"b": "x"}) == ["a 1 → (unset)", "b (unset) → 'x'"]


def test_plan_flags_a_cached_artifact_built_under_other_numerics(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, tasks = _plan("t_source", [])
    [done] = run_tasks(tasks, cfg.run)
    if "numpy" not in NUMERIC_PACKAGES:
        monkeypatch.setattr("pipeline.environment.NUMERIC_PACKAGES", [*NUMERIC_PACKAGES, "numpy"])
    path = done.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["packages"]["numpy"] = "0.0.1"
    path.write_text(json.dumps(seal_manifest(manifest)))
    note = Explainer(ArtifactStore(toy)).drift(done.id)
    assert note is not None and note.startswith("built under other package versions: numpy 0.0.1 → ")
