"""Experiments: matrix expansion deduplicated by artifact id, and the report they end in."""
from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import experiments
from pipeline.cli import main
from pipeline.config import Variants
from pipeline.experiments import Experiment
from stages.report import CSV_COLUMNS
from tests.faults_util import TINY


def _experiment(tmp_path: Path, matrix: list[dict[str, list[object]]], **extra: object) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"experiment": "tiny", "overrides": TINY, "matrix": matrix,
                                    "targets": ["evaluate"], "collect": "report", **extra}))
    return path


def test_a_sweep_shares_tokens_and_one_pca_fit(tmp_path: Path) -> None:
    path = _experiment(tmp_path, [{"projection.method": ["pca", "rp"], "projection.dim": [2, 3, 4]}])
    tasks, targets = Experiment.load(str(path)).plan()
    stages = Counter(t.stage for t in tasks)
    assert stages["extract"] == 2  # one tokens artifact per split, shared by all six points
    assert sum(t.stage == "reduce" and t.params["projection.method"] == "pca" for t in tasks) == 1  # one fit, 3 dims
    assert sum(t.stage == "reduce" and t.params["projection.method"] == "rp" for t in tasks) == 3  # one RP per dim
    assert stages["evaluate"] == 6 and stages["probe"] == 6 and stages["report"] == 1
    assert len({t.id for t in tasks}) == len(tasks) and targets == [tasks[-1].id]
    report = tasks[-1]
    assert sorted(report.inputs.values()) == sorted(t.id for t in tasks if t.stage == "evaluate")


def test_identity_points_collapse_and_the_report_has_tables_csv_and_figures(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    path = _experiment(tmp_path, [{"projection.method": ["identity"], "projection.dim": [2, 3]},
                                  {"projection.method": ["pca"], "projection.dim": [2, 3]}],
                       copy_to=str(out))
    tasks, _ = Experiment.load(str(path)).plan()
    assert Counter(t.stage for t in tasks)["evaluate"] == 3  # identity ignores the dim: one evaluation
    result = CliRunner().invoke(main, ["--quiet", "run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = Path(result.stdout.strip().splitlines()[-1])
    with open(report / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 3 * 2  # 3 evaluations × (linear, cluster), no CRF
    assert {(r["method"], r["probe"]) for r in rows} >= {("identity", "linear"), ("pca", "cluster")}
    assert all(0.0 <= float(r["miou"]) <= 100.0 and r["eval_id"].startswith("evaluate-") for r in rows)
    text = (report / "report.md").read_text()
    assert "## Table 2" in text and "| DINO (stegopipe) |" in text and "| synthetic | PCA | 3 | cluster |" in text
    assert (report / "fig4_miou.png").stat().st_size > 1000 and (report / "fig4_accuracy.png").is_file()
    assert "## Figure 3" in text and (report / "fig3.png").is_file()  # the PCA fit behind the evaluations
    lineage = json.loads((report / "lineage.json").read_text())
    assert all(node["stage"] == "evaluate" for node in lineage.values())
    assert {node["label"].split(" ")[3] for node in lineage.values()} == {"DINO", "PCA"}  # labelled, inputs too
    assert all(" val " in node["inputs"]["tokens"]["label"] for node in lineage.values())
    assert (out / "report.md").read_text() == text  # copied to the experiment's copy_to folder


def test_a_fig3_style_report_draws_the_pca_explained_variance(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "evr.yaml"
    path.write_text(yaml.safe_dump({"experiment": "evr", "overrides": TINY,
                                    "matrix": [{"projection.method": ["pca"]}], "targets": ["reduce"],
                                    "collect": "report"}))
    result = CliRunner().invoke(main, ["--quiet", "run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = Path(result.stdout.strip().splitlines()[-1])
    text = (report / "report.md").read_text()
    assert "## Figure 3" in text and "| synthetic | vit_small_patch16_224, random init (seed 0) | 384 |" in text
    assert (report / "fig3.png").stat().st_size > 1000


def _planned(name: str, overrides: tuple[str, ...] = ()) -> list[tuple[str, dict[str, object], dict[str, object]]]:
    problems: list[str] = []
    tasks, _ = Experiment.load(name).plan(overrides, problems)
    return [(t.id, t.params, t.cfg) for t in tasks]


@pytest.mark.parametrize("name", ["demo", "table2", "fig4"])
def test_cells_planned_without_a_merge_each_equal_a_full_load_config_each(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An experiment merges its preset once and sets each cell's leaves on a copy of the plain tree: every
    task (id, params, config) equals the plan that loads every cell's config in full."""
    calls = Counter[str]()
    real = experiments.load_config

    def counted(preset: str | None = None, overrides: Sequence[str] = ()) -> object:
        calls[str(preset)] += 1
        return real(preset, overrides)

    monkeypatch.setattr(experiments, "load_config", counted)
    fast = _planned(name)
    assert not calls  # not one per cell (was one per cell and one for the collecting report)
    monkeypatch.setattr(Variants, "tree", lambda self, overrides: None)  # every cell through load_config
    assert _planned(name) == fast and len(fast) > 10


def test_a_cell_falls_back_to_load_config_where_a_leaf_copy_could_differ() -> None:
    variants = Variants("synthetic", ["evaluate.crf=true"], ["projection.dim=8"])
    assert variants.tree(["projection.method=pca"])["projection"] == {"method": "pca", "dim": 8, "seed": 0}
    assert variants.tree(["projection.dim=4"]) is None  # the command line's projection.dim wins: load_config
    assert variants.tree(["projection.method=nope"])["projection"]["method"] == "nope"  # str field; plan checks choices
    assert variants.tree(["evaluate.crf=maybe"]) is None  # a bool field refuses it: load_config names it
    assert variants.tree(["head.lr=1"]) is None  # a float field would convert 1: load_config does
    assert variants.tree(["projection.dimm=4"]) is None and variants.tree(["projection={}"]) is None
    assert variants.tree(["dataset.root=${oc.env:HOME}"]) is None
    assert variants.base["projection"]["method"] == "identity"  # variants never change the base tree


def test_experiment_overrides_equal_per_cell_load_config_with_command_line_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _planned("demo", ("projection.dim=8", "head.steps=3"))
    monkeypatch.setattr(Variants, "tree", lambda self, overrides: None)
    assert _planned("demo", ("projection.dim=8", "head.steps=3")) == fast


def test_cell_configs_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "a"))
    first = Experiment.load("demo").plan()[0][0].cfg["run"]["root"]
    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "b"))
    assert (first, Experiment.load("demo").plan()[0][0].cfg["run"]["root"]) == (str(tmp_path / "a"), str(tmp_path / "b"))
