"""Hydra-style multiruns (`run -m` / `plan -m`): comma lists are axes of one experiment, planned as one DAG;
`experiments` lists every experiment with its size and what is cached. Planning only (no stage runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.experiments import Experiment, sweep_values

SWEEP = ("--preset", "synthetic", "projection.method=pca,rp", "projection.dim=4,16", "projection.seed=0,1")


def _invoke(root: Path, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env={"STEGOPIPE_ROOT": str(root)}, catch_exceptions=False)


def test_sweep_values_split_top_level_commas_only() -> None:
    assert sweep_values("projection.dim=4,16") == [4, 16]
    assert sweep_values("projection.method=pca,rp") == ["pca", "rp"]
    assert sweep_values("projection.dim=4") is None
    assert sweep_values("head.shifts=[1,2]") is None and sweep_values("x='a,b'") is None


def test_plan_m_is_one_dag_with_shared_upstream(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "plan", "-m", "evaluate", *SWEEP, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    stages = [row["stage"] for row in plan["rows"]]
    # 2 methods x 2 dims x 2 seeds evaluations over ONE train and ONE val tokens artifact, one PCA fit
    assert stages.count("evaluate") == 8 and stages.count("extract") == 2 and stages.count("probe") == 8
    assert stages.count("reduce") == 1 + 4  # PCA: one fit for every dim and seed; RP: one per dim and seed
    assert len(plan["targets"]) == 8
    labels = {row["label"] for row in plan["rows"] if row["stage"] == "evaluate"}
    assert "synthetic ViT-S/8 random RP d=16 seed=1" in labels and len(labels) == 8


def test_plan_m_with_a_report_collects_every_point(tmp_path: Path) -> None:
    plan = json.loads(_invoke(tmp_path, "plan", "-m", "evaluate", *SWEEP, "--report", "mine", "--json").stdout)
    assert plan["rows"][-1]["stage"] == "report"
    assert plan["rows"][-1]["label_fields"] == {"dataset": "synthetic", "backbone": "ViT-S/8 random", "experiment": "mine"}
    assert len(plan["rows"][-1]["inputs"]) == 8
    assert Experiment.sweep("evaluate", ["projection.dim=4,16"], report="mine").spec["copy_to"] == "reports/mine"


def test_a_comma_list_without_m_says_how_to_sweep(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "plan", "evaluate", "--preset", "synthetic", "projection.dim=4,16")
    assert result.exit_code == 2 and "add -m" in result.stderr
    assert "--report" in _invoke(tmp_path, "plan", "evaluate", "--report", "x").stderr


def test_experiments_lists_size_and_cached(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "experiments")
    demo = next(line for line in result.stdout.splitlines() if line.startswith("demo "))
    assert demo.split()[1:4] == ["56", "0", "0"]  # 56 artifacts, none cached, 0 B


def test_demo_shares_the_stage_targets_cache(tmp_path: Path) -> None:
    """`make extract` / `make knn` after `make demo` (same preset) plan the demo's artifacts, not new ones."""
    demo = {row["id"] for row in json.loads(_invoke(tmp_path, "plan", "demo", "--json").stdout)["rows"]}
    for args in (("extract",), ("extract", "split=val"), ("knn",), ("reduce", "projection.method=pca")):
        rows = json.loads(_invoke(tmp_path, "plan", *args, "--preset", "synthetic", "--json").stdout)["rows"]
        assert {row["id"] for row in rows} <= demo, args


def test_config_refuses_what_plan_refuses(tmp_path: Path) -> None:
    for override in ("head.steps=-5", "evaluate.crf_pixels=all"):
        config = _invoke(tmp_path, "config", "synthetic", override)
        plan = _invoke(tmp_path, "plan", "evaluate", "--preset", "synthetic", "projection.method=stego", override)
        assert (config.exit_code, plan.exit_code) == (2, 1), (override, config.stderr, plan.stderr)  # plan: blocked
        assert override.split("=")[0] in config.stderr
    assert _invoke(tmp_path, "config", "synthetic", "head.steps=5").exit_code == 0


def test_stages_are_listed_in_pipeline_order(tmp_path: Path) -> None:
    names = [line.split()[0] for line in _invoke(tmp_path, "stages").stdout.splitlines()[1:]]
    order = ["synthesize", "prepare", "extract", "knn", "reduce", "train-head", "probe", "evaluate", "report"]
    assert [name for name in names if name in order] == order  # (test plugins' toy stages may follow)


def test_plan_shows_the_whole_dag_and_every_problem_without_weights_or_data(tmp_path: Path,
                                                                            monkeypatch: Any) -> None:
    monkeypatch.delenv("STEGOPIPE_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("STEGOPIPE_DATA_ROOT", raising=False)
    result = _invoke(tmp_path, "plan", "table2", "--json")
    assert result.exit_code == 1
    plan = json.loads(result.stdout)
    stages = {row["stage"] for row in plan["rows"]}
    assert {"prepare", "extract", "knn", "train-head", "probe", "evaluate"} <= stages  # not only the first 6
    blocked = [row for row in plan["rows"] if row["status"] == "blocked"]
    assert blocked and all("-?" in row["id"] and row["waits"] for row in blocked)
    assert any("dino_vitbase8_pretrain.pth" in row["waits"][0] for row in blocked if row["stage"] == "extract")
    problems = " ".join(plan["problems"])
    assert "dino_vitbase8_pretrain.pth" in problems and "dino_deitsmall8_300ep_pretrain.pth" in problems
    assert problems.count("data root") == 3  # weights AND data roots, at once
    text = _invoke(tmp_path, "plan", "table2").stdout
    assert "waits for: its input 'tokens' (extract, which waits too)" in text and " blocked" in text


def test_seed_is_the_run_seed_in_sweeps_overrides_and_config(tmp_path: Path) -> None:
    """`seed=0,1` sweeps the run seed (the report's, projection.seed): the same plan as spelling it out."""
    short = _invoke(tmp_path, "plan", "-m", "evaluate", *SWEEP[:-1], "seed=0,1", "--json")
    assert short.exit_code == 0, short.output
    long = _invoke(tmp_path, "plan", "-m", "evaluate", *SWEEP, "--json")
    assert [r["id"] for r in json.loads(short.stdout)["rows"]] == [r["id"] for r in json.loads(long.stdout)["rows"]]
    assert yaml.safe_load(_invoke(tmp_path, "config", "synthetic", "seed=3").stdout)["projection"]["seed"] == 3
    one = _invoke(tmp_path, "plan", "evaluate", "--preset", "synthetic", "seed=1", "--json")
    assert {r["label_fields"].get("seed") for r in json.loads(one.stdout)["rows"] if r["stage"] == "evaluate"} == {1}
    wrong = _invoke(tmp_path, "plan", "-m", "evaluate", "--preset", "synthetic", "sed=0,1")
    assert wrong.exit_code == 2 and "unknown config key 'sed'" in wrong.stderr and "seed" in wrong.stderr
