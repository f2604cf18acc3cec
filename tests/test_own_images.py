"""Your own images: a `folder` dataset without labels runs the whole flow; evaluate skips the linear probe and
the metrics with one warning and writes no all-null metrics; predict writes no linear maps from a linear
probe that never saw a labelled pixel."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks

torch.set_num_threads(1)

SMALL = ["run.executor=local", "dataset.name=folder", "dataset.n_classes=3",
         "backbone.name=vit_small_patch16_224.dino", "extract.train_res=32", "extract.val_res=48",
         "extract.loader_workers=0", "knn.k=4", "head.num_neighbors=3", "head.steps=5", "head.batch_size=4",
         "head.val_every=5", "head.feature_samples=3", "head.dim=6", "probe.steps=5", "probe.batch_size=4",
         "evaluate.examples=1", "projection.method=stego"]


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        folder = root / "imgs" / split
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return root


def test_a_folder_without_labels(root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _images(tmp_path / "mine")
    cfg = load_config("folder", [*SMALL, f"dataset.root={data}"])
    tasks, targets = plan([Request("evaluate", cfg)])
    with caplog.at_level(logging.INFO, logger="stegopipe"):
        results = {r.id: r for r in run_tasks(tasks, cfg.run)}
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no labelled pixel" in warnings[0] and "stegopipe predict" in warnings[0]
    evaluation = results[targets[0]].path
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["scores"] == {}  # no all-null metrics
    assert json.loads((evaluation / "manifest.json").read_text())["headline"].startswith("no labelled val pixels")
    assert len(list((evaluation / "examples").glob("*.png"))) == 1  # the image and its clusters, still shown

    head = next(t.id for t in tasks if t.stage == "train-head")
    out = tmp_path / "pred"
    result = CliRunner().invoke(main, ["predict", "--head", head, "--out", str(out), str(data / "imgs/val/im0.png")])
    assert result.exit_code == 0, result.output
    assert "never trained" in result.stderr
    assert (out / "im0.cluster.png").is_file() and not list(out.glob("*.linear*"))
    assert json.loads((out / "predictions.json").read_text())["maps"] == ["cluster"]


def test_evaluate_prints_headline_numbers(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("synthetic", ["run.executor=local", "dataset.synthetic.n_train=4", "dataset.synthetic.n_val=2",
                                    "dataset.synthetic.height=40", "dataset.synthetic.width=48",
                                    "backbone.name=vit_small_patch16_224.dino", "extract.train_res=32",
                                    "extract.val_res=48", "probe.steps=5", "probe.batch_size=2", "evaluate.examples=0"])
    tasks, targets = plan([Request("evaluate", cfg)])
    with caplog.at_level(logging.INFO, logger="stegopipe"):
        run_tasks(tasks, cfg.run)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"[done] {targets[0]}")]
    assert len(done) == 1 and "linear mIoU " in done[0] and "| cluster mIoU " in done[0] and " acc " in done[0]
