"""The stage contract (pipeline/params.py), over every registered stage, every id field of the sections it
declares and every context it declares: flipping a field the params include (raw or through a derived
value) changes the params (and so the artifact id); flipping a field the stage excludes there (before and
after the flip) does not change them; flipping a runtime field changes no params of the stage or upstream
(so no id). ``ctx.config`` holds exactly the included fields."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import stages.plugin  # noqa: F401  (registers every stage)
from pipeline.config import field_choices, load_config, section_class, section_fields, to_container
from pipeline.errors import ConfigError
from pipeline.params import Context, Exclude, Params, id_fields, resolve
from pipeline.planner import Request, plan
from pipeline.registry import STAGES, Stage, get_stage, id_params, stage_config
from stages.backbones import BACKBONES

FILES = ("data", "data2", "weights", "weights2", "checkpoint", "checkpoint2")
"""The ``{placeholders}`` a stage's contexts may use: two dataset folders, two DINO weights folders (the
ViT-S/8 file, different content) and two checkpoint files (only hashed)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("contract")
    for name in ("data", "data2"):
        (tmp / name).mkdir()
        (tmp / name / "x.txt").write_text(name)
    dino_file = BACKBONES["vit_small_patch8_224.dino"].dino_file
    for name in ("weights", "weights2"):
        (tmp / name).mkdir()
        (tmp / name / dino_file).write_bytes(name.encode())
    for name in ("checkpoint", "checkpoint2"):
        (tmp / f"{name}.ckpt").write_bytes(f"{name}: not a checkpoint, only hashed".encode())
    paths = {name: str(tmp / name) for name in FILES}
    paths["checkpoint"], paths["checkpoint2"] = str(tmp / "checkpoint.ckpt"), str(tmp / "checkpoint2.ckpt")
    return paths


def _other(key: str, typ: Any, meta: dict[str, Any], value: Any, files: dict[str, str]) -> Any:
    """A valid value different from ``value``."""
    paths = {"dataset.root": ("data", "data2"), "backbone.weights_dir": ("weights", "weights2"),
             "head.checkpoint": ("checkpoint", "checkpoint2")}
    special = {"dataset.name": "cocostuff27", "dataset.class_names": ["a", "b", "c"],
               "backbone.name": "vit_small_patch16_224.dino", "backbone.weights": "timm",
               "extract.train_res": 256, "extract.val_res": 336}
    if key in paths:
        first, second = (files[name] for name in paths[key])
        return second if value == first else first
    if key in special:
        return special[key]
    choices = field_choices(meta)
    if choices:
        return choices[(list(choices).index(value) + 1) % len(choices)]  # the next one, cyclically
    if "list" in str(typ):
        return [*(value or []), "x"]
    if isinstance(value, bool) or "bool" in str(typ):
        return not value
    if isinstance(value, int) or (value is None and "int" in str(typ)):
        return (value or 0) + 8
    if isinstance(value, float):
        return value * 0.5 + 0.01
    if isinstance(value, str) or "str" in str(typ):
        return "elsewhere"
    raise AssertionError(f"no alternative value for {key}={value!r} ({typ})")


def _yaml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _overrides(context: Context, files: dict[str, str]) -> list[str]:
    return [override.format(**files) for override in context.overrides]


def _resolved(stage: Stage, overrides: list[str], args: dict[str, Any], *, upstream: bool) -> tuple[Any, str] | None:
    """(resolved params, with ``upstream``: what the artifact id is made of apart from code, i.e. the params
    of the stage and of every task upstream in plan order) of ``stage`` under ``overrides``; None where the
    config is invalid. (Ids themselves also hash the code, which other work may edit while this runs.)"""
    try:
        cfg = load_config(None, overrides)
        args = {**stage.args, **args}
        id_params(stage, cfg, args)  # the sections' choices and ranges, the stage's check
        resolved = resolve(stage.params, stage.sections, to_container(cfg), args)
        if not upstream:
            return resolved, ""
        tasks, _ = plan([Request(stage.name, cfg, args)])
    except ConfigError:
        return None
    return resolved, json.dumps([(t.stage, t.params, sorted(t.inputs)) for t in tasks], sort_keys=True, default=str)


def _stages() -> list[str]:
    return sorted(name for name, stage in STAGES.items() if stage.run.__module__.startswith("stages."))


def _fields(stage: Stage) -> list[tuple[str, Any, dict[str, Any]]]:
    return [(f"{path}.{key}", typ, meta) for path in stage.sections
            for key, typ, meta in section_fields(section_class(path))]


def _cases() -> list[tuple[str, int]]:
    return [(name, k) for name in _stages() for k in range(len((STAGES[name].params or Params()).test_contexts()))]


@pytest.mark.parametrize(("name", "k"), _cases(), ids=lambda x: str(x))
def test_every_field_in_every_declared_context(name: str, k: int, files: dict[str, str]) -> None:
    stage = STAGES[name]
    context = (stage.params or Params()).test_contexts()[k]
    base = _overrides(context, files)
    before = _resolved(stage, base, dict(context.args), upstream=True)
    assert before is not None, f"{name} cannot be planned in its declared context {context}"
    failures = []
    for key, typ, meta in _fields(stage):
        value = load_config(None, base)
        for part in key.split("."):
            value = value[part]
        value = to_container(value)
        after = _resolved(stage, base + [f"{key}={_yaml(_other(key, typ, meta, value, files))}"], dict(context.args),
                          upstream=bool(meta.get("runtime")))
        if after is None:
            continue  # the flipped value is invalid here (e.g. a dataset that needs another root)
        if meta.get("runtime"):
            if after[1] != before[1]:
                failures.append(f"runtime field {key} changes the params of the stage or of an upstream one")
        elif key in before[0].excluded and key in after[0].excluded:
            if after[0].params != before[0].params:
                failures.append(f"{key} is excluded ({before[0].excluded[key]}) but changes the params")
        elif after[0].params == before[0].params:
            failures.append(f"id field {key}={value!r} does not change the params")
    assert not failures, f"{name} under {context}: " + "; ".join(failures)


@pytest.mark.parametrize("name", _stages())
def test_every_id_field_is_tested_somewhere(name: str, files: dict[str, str]) -> None:
    """Each id field is included (and flipped) in at least one declared context, or excluded everywhere
    with a reason; so a stage cannot leave a field untested by declaring no context for it."""
    stage = STAGES[name]
    seen: dict[str, str] = {}
    for context in (stage.params or Params()).test_contexts():
        resolved = _resolved(stage, _overrides(context, files), dict(context.args), upstream=False)
        assert resolved is not None
        for key in id_fields(stage.sections):
            if key not in resolved[0].excluded:
                seen[key] = "included"
            else:
                seen.setdefault(key, resolved[0].excluded[key])
    reasons = {k: v for k, v in seen.items() if v != "included"}
    assert all(reasons.values()), reasons
    assert set(seen) == set(id_fields(stage.sections))


def test_every_stage_declares_sections_and_contexts() -> None:
    plugin = {n: s for n, s in STAGES.items() if s.run.__module__.startswith("stages.")}
    assert set(plugin) >= {"synthesize", "prepare", "extract", "knn", "reduce", "train-head", "probe", "evaluate",
                           "report"}
    assert all(s.sections for s in plugin.values())
    reduce_contexts = {o for c in STAGES["reduce"].params.test_contexts() for o in c.overrides
                       if o.startswith("projection.method=")}
    assert reduce_contexts >= {"projection.method=pca", "projection.method=rp", "projection.method=hnne"}


def test_ctx_config_holds_exactly_the_included_fields() -> None:
    cfg = to_container(load_config(None, ["projection.method=pca"]))
    view = stage_config(get_stage("reduce"), cfg, {})
    assert "dim" not in view.projection and "seed" not in view.projection  # one PCA fit serves every dim
    assert "hnne_tokens" not in view.reduce and view.reduce.fit_subset == "images"
    with pytest.raises(Exception, match="dim"):
        view.projection.dim  # noqa: B018  (reading an excluded field fails)
    assert "backend" not in view.reduce  # runtime fields are ctx.runtime's
    view = stage_config(get_stage("extract"), to_container(load_config(None, [])), {"split": "val"})
    assert "train_res" not in view.extract and view.extract.val_res == 320


def test_params_are_every_included_field_args_and_derived_values() -> None:
    params = id_params(get_stage("extract"), load_config(None, []), {"split": "train"})
    assert params["split"] == "train" and params["weights_tag"] == "random-seed0"
    assert params["extract.train_res"] == 224 and "extract.val_res" not in params
    assert not any(k.startswith("backbone.weights") or k == "backbone.seed" for k in params)  # the tag covers them


def test_an_excluded_field_cannot_be_read() -> None:
    """A field dropped from the params (here head.lr, by a wrong exclusion) is gone from ``ctx.config`` too:
    a stage that still read it would fail instead of producing results its id does not cover."""
    stage = STAGES["train-head"]
    wrong = Exclude(("head.lr",), "not read (wrong)", when=lambda cfg, args: cfg.projection.dim is not None)
    spec = Params(exclude=(*stage.params.exclusions(), wrong), derive=stage.params.derive)
    tree = to_container(load_config(None, ["projection.method=stego", "projection.dim=50"]))
    resolved = resolve(spec, stage.sections, tree, {})
    assert resolved.excluded["head.lr"] == "not read (wrong)" and "head.lr" not in resolved.params
    assert "lr" not in resolved.config["head"]
    assert resolve(stage.params, stage.sections, tree, {}).config["head"]["lr"] == 5e-4


def test_a_stage_cannot_read_runtime_fields_or_undeclared_sections() -> None:
    view = stage_config(get_stage("knn"), to_container(load_config(None, [])), {})
    assert view.knn.k == 30
    with pytest.raises(Exception, match="batch_size"):
        view.knn.batch_size  # noqa: B018
    with pytest.raises(Exception, match="probe"):
        view.probe  # noqa: B018


def test_params_must_be_a_declaration() -> None:
    from pipeline.registry import register_stage

    with pytest.raises(TypeError, match="Params declaration"):
        register_stage("t_handmade", kind="toy", params=lambda cfg, args: {})  # type: ignore[arg-type]


def test_a_choice_outside_the_allowed_values_is_one_config_error() -> None:
    cfg = load_config(None, ["reduce.fit_subset=some", "projection.method=pca"])
    with pytest.raises(ConfigError, match=r"reduce.fit_subset='some': expected one of all, images, tokens"):
        plan([Request("reduce", cfg)])
    cfg = load_config(None, ["knn.block_size=0"])
    with pytest.raises(ConfigError, match=r"knn.block_size=0: must be >= 1"):
        plan([Request("knn", cfg)])


def test_files_helper_paths_exist(files: dict[str, str]) -> None:
    assert all(Path(p).exists() for p in files.values())
