"""Planning computes each config's plain dict and each stage's id params once per plan (pipeline.planner._Memo)
and merges each preset once (pipeline.config): the planned ids must be exactly those of the uncached path."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import registry
from pipeline.artifacts import artifact_id
from pipeline.config import check_section, load_config, load_yaml
from pipeline.experiments import Experiment, experiment_names
from pipeline.planner import Request, plan
from pipeline.params import resolve

registry.load_plugins(registry.plugin_names())


@pytest.fixture
def plannable(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data roots and (fake) DINO weights, so every experiment of configs/experiments can be planned."""
    from stages.backbones import BACKBONES

    for name in ("cocostuff", "cityscapes", "potsdam"):
        (tmp_path / "data" / name).mkdir(parents=True)
    weights = tmp_path / "weights"
    weights.mkdir()
    for spec in BACKBONES.values():
        if spec.dino_file:
            (weights / spec.dino_file).write_bytes(b"fake")
    monkeypatch.setenv("STEGOPIPE_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("STEGOPIPE_WEIGHTS_DIR", str(weights))


def _reference_id(request: Request) -> str:
    """The id of a request, the slow way: OmegaConf selects per section, a view per stage run, no memo."""
    stage = registry.get_stage(request.stage)
    args = {**stage.args, **request.args}
    upstream = {**stage.inputs(request.cfg, args), **request.extra_inputs}
    inputs = {name: req if isinstance(req, str) else _reference_id(req) for name, req in upstream.items()}
    for path in stage.sections:
        check_section(path, OmegaConf.select(request.cfg, path))
    params = resolve(stage.params, stage.sections, OmegaConf.to_container(request.cfg, resolve=True), args).params
    return artifact_id(stage.name, registry.stage_code(stage, registry.stage_fingerprint(stage).digest), params, inputs)


def _reference_targets(experiment: Experiment, overrides: list[str]) -> list[str]:
    base = list(experiment.spec.get("overrides") or [])
    return [_reference_id(Request(stage, load_config(preset, base + point + overrides), args))
            for preset, point in experiment.points() for stage, args in experiment.targets()]


def _targets_before_collect(experiment: Experiment, overrides: list[str]) -> list[str]:
    tasks, _ = experiment.plan(overrides)
    collect = experiment.spec.get("collect")
    return list(tasks[-1].inputs.values()) if collect else [t.id for t in tasks]


def _check_against_reference(name: str, overrides: list[str]) -> None:
    experiment = Experiment.load(name)
    expected = list(dict.fromkeys(_reference_targets(experiment, overrides)))
    tasks, _ = experiment.plan(overrides)
    planned = {t.id for t in tasks}
    assert set(expected) <= planned
    if experiment.spec.get("collect"):
        assert list(tasks[-1].inputs.values()) == expected


def test_demo_ids_match_the_uncached_path(plannable: None) -> None:
    _check_against_reference("demo", [])
    _check_against_reference("demo", ["head.lr=0.0003"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fig3", "fig4", "hnne", "table2"])
def test_every_experiment_matches_the_uncached_path(plannable: None, name: str) -> None:
    assert name in experiment_names()
    _check_against_reference(name, [])


def test_equal_plans_are_equal_and_overrides_do_not_leak(plannable: None) -> None:
    demo = Experiment.load("demo")
    tasks_a, targets_a = demo.plan()
    tasks_b, targets_b = demo.plan()
    assert [(t.id, t.params, t.inputs, t.cfg) for t in tasks_a] == [(t.id, t.params, t.inputs, t.cfg) for t in tasks_b]
    assert targets_a == targets_b
    tasks_c, targets_c = demo.plan(["head.lr=0.0003"])
    assert targets_c != targets_a
    by_stage = {s: ({t.id for t in tasks_a if t.stage == s}, {t.id for t in tasks_c if t.stage == s})
                for s in ("extract", "train-head")}
    assert all(a and b for a, b in by_stage.values())
    assert by_stage["extract"][0] == by_stage["extract"][1]  # upstream of the head: shared
    assert not by_stage["train-head"][0] & by_stage["train-head"][1]  # the head changed


def test_one_plan_keeps_two_configs_of_one_stage_apart(plannable: None) -> None:
    cfg_a = load_config(None, ["head.lr=0.001"])
    cfg_b = load_config(None, ["head.lr=0.002"])
    tasks, targets = plan([Request("train-head", cfg_a), Request("train-head", cfg_b), Request("train-head", cfg_a)])
    assert targets[0] != targets[1] and targets[0] == targets[2]
    assert targets == [_reference_id(Request("train-head", c)) for c in (cfg_a, cfg_b, cfg_a)]
    heads = [t for t in tasks if t.stage == "train-head"]
    assert len(heads) == 2
    heads[0].cfg["head"]["lr"] = 99.0  # a task's cfg is its own copy
    assert heads[1].cfg["head"]["lr"] == 0.002 and cfg_a.head.lr == 0.001


def test_load_config_returns_a_new_config_each_time(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("head:\n  lr: 0.005\n")
    first = load_config(str(preset))
    first.head.lr = 1.0
    assert load_config(str(preset)).head.lr == 0.005
    with_overrides = load_config(str(preset), ["head.dim=7"])
    with_overrides.head.lr = 2.0
    assert load_config(str(preset), ["head.dim=7"]).head.lr == 0.005
    data = load_yaml(preset)
    data["head"]["lr"] = 3.0
    assert load_yaml(preset) == {"head": {"lr": 0.005}}
    preset.write_text("head:\n  lr: 0.006\n")  # a changed file is read again
    assert load_config(str(preset)).head.lr == 0.006
