"""The stage contract, over every registered stage and every field of the sections it declares:
changing an id field changes the artifact id (in at least one of the stage's contexts below: a field
may apply to one split or one method only), changing a runtime field never does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import stages.plugin  # noqa: F401  (registers every stage)
from pipeline.config import load_config, section_class, section_fields
from pipeline.errors import ConfigError
from pipeline.planner import Request, plan
from pipeline.registry import STAGES
from stages.backbones import BACKBONES

FOLDER = "folder"
# per stage: (overrides, request args) under which its fields apply; the default config otherwise
CONTEXTS: dict[str, list[tuple[list[str], dict[str, Any]]]] = {
    "prepare": [([], {"split": "train"}), ([], {"split": "val"}), ([FOLDER], {"split": "train"})],
    "extract": [([], {"split": "train"}), ([], {"split": "val"}), (["weights=dino"], {"split": "train"})],
    "reduce": [(["projection.method=pca"], {}), (["projection.method=pca", "reduce.materialize=true"], {}),
               (["projection.method=rp", "projection.dim=4"], {}),
               (["projection.method=hnne", "projection.dim=2"], {})],
    "train-head": [([], {}), (["projection.method=stego", "projection.dim=50"], {})],
    "probe": [(["projection.method=pca", "projection.dim=4"], {}), ([], {})],
    "evaluate": [(["projection.method=pca", "projection.dim=4", "evaluate.crf=true"], {})],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Things some fields point at: a dataset folder, a checkpoint, two DINO weights folders."""
    tmp = tmp_path_factory.mktemp("contract")
    for name in ("data", "data2"):
        (tmp / name).mkdir()
        (tmp / name / "x.txt").write_text("x")
    (tmp / "ckpt.pt").write_bytes(b"not a checkpoint, only hashed")
    dino_file = BACKBONES["vit_small_patch8_224.dino"].dino_file
    for name in ("w1", "w2"):
        (tmp / name).mkdir()
        (tmp / name / dino_file).write_bytes(name.encode())
    return {"data": str(tmp / "data"), "data2": str(tmp / "data2"), "ckpt": str(tmp / "ckpt.pt"), "w1": str(tmp / "w1"), "w2": str(tmp / "w2")}


def _expand(override: str, files: dict[str, Any]) -> list[str]:
    if override == FOLDER:
        return ["dataset.name=folder", f"dataset.root={files['data']}", "dataset.n_classes=3"]
    if override == "weights=dino":
        return ["backbone.weights=dino", f"backbone.weights_dir={files['w1']}"]
    return [override]


def _other(key: str, typ: Any, meta: dict[str, Any], value: Any, files: dict[str, Any]) -> Any:
    """A valid value different from ``value``."""
    special = {"dataset.name": "cocostuff27", "dataset.root": files["data2"],
               "dataset.class_names": ["a", "b", "c"], "backbone.name": "vit_small_patch16_224.dino",
               "backbone.weights": "timm", "backbone.weights_dir": files["w2"], "head.checkpoint": files["ckpt"],
               "extract.train_res": 256, "extract.val_res": 256}
    if key in special:
        return special[key]
    if meta.get("choices"):
        choices = list(meta["choices"])  # the next one, cyclically
        return choices[(choices.index(value) + 1) % len(choices)]
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


def _id(stage: str, overrides: list[str], args: dict[str, Any]) -> str | None:
    try:
        cfg = load_config(None, overrides)
        _, targets = plan([Request(stage, cfg, args)])
    except ConfigError:
        return None  # the flipped value does not apply here (e.g. needs another method)
    return targets[0]


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for name, stage in sorted(STAGES.items()):
        if not stage.run.__module__.startswith("stages."):
            continue
        # no stage can see ``run``: checked once, on the stage with the deepest graph
        for section in (*stage.sections, *(["run"] if name == "evaluate" else [])):
            for key, _, meta in section_fields(section_class(section)):
                cases.append((name, f"{section}.{key}", "runtime" if meta.get("runtime") or section == "run" else "id"))
    return cases


def test_every_stage_declares_its_sections() -> None:
    plugin = {n: s for n, s in STAGES.items() if s.run.__module__.startswith("stages.")}
    assert set(plugin) >= {"synthesize", "prepare", "extract", "knn", "reduce", "train-head", "probe", "evaluate",
                           "report"}
    assert all(s.sections for s in plugin.values())


@pytest.mark.parametrize(("stage", "key", "kind"), _cases(), ids=lambda x: str(x))
def test_changing_a_field(stage: str, key: str, kind: str, files: dict[str, Any]) -> None:
    section, _, leaf = key.partition(".")
    if section == "dataset" and leaf.startswith("synthetic."):
        section, leaf = "dataset.synthetic", leaf.removeprefix("synthetic.")
    meta = next(m for k, t, m in section_fields(section_class(section)) if k == leaf)
    typ = next(t for k, t, m in section_fields(section_class(section)) if k == leaf)
    seen = []
    for overrides, args in CONTEXTS.get(stage, [([], {})]):
        base = [o for ov in overrides for o in _expand(ov, files)]
        before = _id(stage, base, args)
        assert before is not None, f"{stage} cannot be planned under {base}"
        value = load_config(None, base)
        for part in key.split("."):
            value = value[part]
        other = _other(key, typ, meta, value, files)
        after = _id(stage, base + [f"{key}={_yaml(other)}"], args)
        if after is not None:
            seen.append(after != before)
    assert seen, f"{stage}: {key} could not be changed in any context"
    if kind == "id":
        assert any(seen), f"{stage}: changing id field {key} never changes the artifact id"
    else:
        assert not any(seen), f"{stage}: changing runtime field {key} changes the artifact id"


def _yaml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]" 
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_a_stage_cannot_read_runtime_fields_or_undeclared_sections() -> None:
    from pipeline.registry import Stage, id_params

    def peek(cfg: Any, args: Any) -> dict[str, Any]:
        return {"n": cfg.knn.batch_size}

    stage = Stage("peek", "1", "knn", lambda ctx: None, peek, lambda c, a: {}, {}, False, "", {}, "", ("knn",))
    with pytest.raises(Exception, match="batch_size"):
        id_params(stage, load_config(None, []), {})
    stage = Stage("peek", "1", "knn", lambda ctx: None, lambda c, a: {"k": c.probe.steps}, lambda c, a: {}, {},
                  False, "", {}, "", ("knn",))
    with pytest.raises(Exception, match="probe"):
        id_params(stage, load_config(None, []), {})


def test_a_choice_outside_the_allowed_values_is_one_config_error() -> None:
    cfg = load_config(None, ["reduce.fit_subset=some", "projection.method=pca"])
    with pytest.raises(ConfigError, match=r"reduce.fit_subset='some': expected one of all, images, tokens"):
        plan([Request("reduce", cfg)])
    cfg = load_config(None, ["knn.block_size=0"])
    with pytest.raises(ConfigError, match=r"knn.block_size=0: must be >= 1"):
        plan([Request("knn", cfg)])


def test_files_helper_paths_exist(files: dict[str, Any]) -> None:
    assert all(Path(p).exists() for p in files.values())
