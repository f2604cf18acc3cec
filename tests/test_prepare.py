"""prepare: indexes the synthetic data through the folder reader; bad inputs fail or are skipped."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.artifacts import ArtifactStore, sha256_file
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.planner import Request, plan
from pipeline.registry import STAGES
from pipeline.runner import run_tasks
from pipeline.specs import load_spec
from stages.datasets.index import load_index


def _prepare(overrides: list[str], split: str = "train") -> Path:
    cfg = load_config(None, ["run.executor=local", *overrides])
    tasks, targets = plan([Request("prepare", cfg, {"split": split})])
    return [r for r in run_tasks(tasks, cfg.run) if r.id == targets[0]][0].path


def _folder(tmp_path: Path, n: int = 3) -> Path:
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / "imgs" / split).mkdir(parents=True)
        (data / "labels" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 30, 3), i * 40, np.uint8)).save(data / "imgs" / split / f"{i}.png")
            Image.fromarray(np.full((20, 30), i % 2, np.uint8)).save(data / "labels" / split / f"{i}.png")
    return data


def test_prepare_indexes_synthetic_with_checksums(root: Path) -> None:
    path = _prepare(["dataset.synthetic.n_train=5", "dataset.synthetic.n_val=2"])
    index = load_index(path)
    assert len(index) == 5 and index.n_classes == 5 and index.split == "train"
    raw = json.loads((path / "index.json").read_text())
    first = raw["samples"][0]
    assert first["image_sha256"] == sha256_file(index.reader.root / first["image"])
    assert index.reader.load_label(index.samples[0]).shape == (96, 128)
    val = load_index(_prepare(["dataset.synthetic.n_train=5", "dataset.synthetic.n_val=2"], split="val"))
    assert len(val) == 2


def test_bad_inputs_error_naming_the_file_or_are_skipped(root: Path, tmp_path: Path) -> None:
    data = _folder(tmp_path)
    base = ["dataset.name=folder", f"dataset.root={data}", "dataset.n_classes=2"]
    good = load_index(_prepare(base))
    assert len(good) == 3

    truncated = data / "imgs" / "train" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(InputError, match=r"1\.png"):
        _prepare(base + ["dataset.check_workers=1"])
    assert not list(ArtifactStore(root).ids("prepare")[1:])  # nothing new published

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "labels" / "train" / "2.png")
    path = _prepare(base + ["dataset.on_bad_input=skip"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["counts"] == {"samples": 1, "skipped": 2}
    reasons = " ".join(s["reason"] for s in manifest["skipped"])
    assert "1.png" in reasons and "2.png" in reasons


def test_prepare_config_errors(root: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.root is required"):
        _prepare(["dataset.name=cocostuff27"])
    with pytest.raises(ConfigError, match="dataset.n_classes"):
        _prepare(["dataset.name=folder", "dataset.root=/tmp"])
    with pytest.raises(ConfigError, match="split"):
        _prepare([], split="test")


def test_every_registered_stage_has_a_storage_spec() -> None:
    plugin = [s for s in STAGES.values() if s.run.__module__.startswith("stages.")]  # not tests' toy stages
    assert len(plugin) >= 9
    for stage in plugin:
        assert load_spec(stage.kind)["kind"] == stage.kind
