"""``stegopipe predict`` on a tiny synthetic chain (random ViT-S/16, 5 head steps): label PNGs and overlays
of the right size and range, the evaluation's cluster assignment, --full, --crf, and clear errors for a
wrong weights tag, wrong artifact ids and probes of another projection."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from pipeline.artifacts import ArtifactStore, seal_manifest
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
from stages.datasets.synthetic import synthetic_scene
from stages.evaluation.figures import palette
from stages.commands.predict import (
    BackboneRecord, backbone_record, check_weights, overlay, panel_legend, prepare_image, write_label_png,
)

torch.set_num_threads(1)

CHAIN = ["run.executor=local", "dataset.synthetic.n_train=8", "dataset.synthetic.n_val=4",
         "dataset.synthetic.height=40", "dataset.synthetic.width=48", "backbone.name=vit_small_patch16_224.dino",
         "extract.train_res=32", "extract.val_res=48", "extract.shard_size=4", "extract.loader_workers=0",
         "knn.k=8", "head.num_neighbors=7", "head.steps=5", "head.batch_size=4", "head.val_every=5",
         "head.feature_samples=3", "head.dim=6", "probe.steps=5", "probe.batch_size=4", "evaluate.examples=0",
         "projection.method=stego"]
N_CLASSES = 5  # the synthetic dataset's classes (no extra clusters)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A built chain (evaluate of a stego head, and a probe of the identity projection), two images."""
    base = tmp_path_factory.mktemp("predict")
    root = base / "artifacts"
    cfg = load_config(None, [*CHAIN, f"run.root={root}"])
    tasks, targets = plan([Request("evaluate", cfg), Request("probe", load_config(
        None, [*CHAIN, f"run.root={root}", "projection.method=identity"]))])
    run_tasks(tasks, cfg.run)
    ids = {t.stage: t.id for t in tasks if t.stage != "probe" or t.id == targets[1]}
    ids["stego_probe"] = next(t.id for t in tasks if t.stage == "probe" and t.id != targets[1])
    rng = np.random.default_rng(3)
    images = []
    for k, (h, w) in enumerate([(40, 56), (64, 48)]):
        rgb, _ = synthetic_scene(rng, h, w)
        images.append(base / f"img{k}.png")
        Image.fromarray(rgb).save(images[-1])
    return {"root": root, "ids": ids, "images": images, "base": base}


def predict(chain: dict[str, Any], *args: str) -> Result:
    return CliRunner().invoke(main, ["predict", *args], env={"STEGOPIPE_ROOT": str(chain["root"])})


def label(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_predict_writes_labels_and_overlays(chain: dict[str, Any], tmp_path: Path) -> None:
    head = chain["ids"]["train-head"]
    result = predict(chain, "--head", head[:20], "--out", str(tmp_path), *map(str, chain["images"]))
    assert result.exit_code == 0, result.output
    for stem in ("img0", "img1"):
        for name in ("linear", "cluster"):
            ids = label(tmp_path / f"{stem}.{name}.png")
            assert ids.shape == (48, 48) and ids.dtype == np.uint8  # default res = the head's val res
            assert ids.max() < N_CLASSES  # raw cluster ids / classes, never unmatched
            with Image.open(tmp_path / f"{stem}.{name}.png") as png:  # a viewer shows the classes' colours
                assert png.mode == "P" and png.getpalette()[:3] == palette(N_CLASSES)[0].tolist()
            over = np.asarray(Image.open(tmp_path / f"{stem}.{name}.overlay.png"))
            assert over.shape == (48, 48, 3)
        with Image.open(tmp_path / f"{stem}.panels.png") as panels:  # titled columns + legend, for readers
            assert panels.info["dpi"][0] == pytest.approx(150, abs=1) and panels.width >= 3 * 300
    summary = json.loads((tmp_path / "predictions.json").read_text())
    assert summary["head"] == head and summary["probes"] == f"{head}/probes" and summary["cluster_ids"] == "clusters"
    assert summary["backbone"]["name"] == "vit_small_patch16_224.dino"
    assert summary["backbone"]["weights_tag"] == "random-seed0"
    assert summary["res"] == 48 and [im["size"] for im in summary["images"]] == [[48, 48], [48, 48]]
    assert summary["images"][0]["files"]["panels"] == "img0.panels.png" and summary["crf_pixels"] is None


def test_eval_assignment_full_image_and_crf(chain: dict[str, Any], tmp_path: Path) -> None:
    ids = chain["ids"]
    store = ArtifactStore(chain["root"])
    metrics = json.loads((store.path(ids["evaluate"]) / "metrics.json").read_text())
    assignment = metrics["scores"]["cluster"]["assignment"]
    pytest.importorskip("pydensecrf")
    result = predict(chain, "--head", ids["train-head"], "--eval", ids["evaluate"], "--full", "--crf", "--res", "32",
                     "--out", str(tmp_path), str(chain["images"][0]))
    assert result.exit_code == 0, result.output
    cluster = label(tmp_path / "img0.cluster.png")
    assert cluster.shape == (40, 56)  # --full: the original size
    assert set(np.unique(cluster)) <= {a for a in assignment if a >= 0} | {255}
    assert label(tmp_path / "img0.linear.png").max() < N_CLASSES
    summary = json.loads((tmp_path / "predictions.json").read_text())
    assert summary["probes"] == metrics["protocol"]["probe_id"] == ids["stego_probe"]
    assert summary["cluster_ids"] == "classes" and summary["crf"] and summary["full"]
    assert summary["crf_pixels"] == "reference"
    assert summary["images"][0]["input_size"] == [32, 48]  # 40x56 → shorter side 32, 56*0.8=44.8 → 48


def test_mismatched_weights_tag_is_a_clear_error(chain: dict[str, Any], tmp_path: Path) -> None:
    result = predict(chain, "--head", chain["ids"]["train-head"], "--set", "backbone.seed=1", "--out", str(tmp_path),
                     str(chain["images"][0]))
    assert result.exit_code == 2
    assert "random-seed1" in result.output and "differs from random-seed0" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--head", "train-head-0000"], "no artifact matches"),
    (["--head", "<knn>"], "is a knn artifact, expected train-head"),
    (["--head", "<train-head>", "--probes", "<probe>"], "trained on the codes of raw tokens"),
    (["--head", "<train-head>", "--eval", "<evaluate>", "--probes", "<train-head>"], "belongs to the probes"),
    (["--head", "<train-head>", "--res", "40"], "multiple of the backbone's patch size 16"),
])
def test_bad_references_are_clear_errors(chain: dict[str, Any], tmp_path: Path, args: list[str], message: str) -> None:
    args = [chain["ids"][a[1:-1]] if a.startswith("<") else a for a in args]
    result = predict(chain, *args, "--out", str(tmp_path), str(chain["images"][0]))
    assert result.exit_code == 2 and message in result.output, result.output


def test_missing_image_is_named(chain: dict[str, Any], tmp_path: Path) -> None:
    result = predict(chain, "--head", chain["ids"]["train-head"], str(tmp_path / "nope.jpg"))
    assert result.exit_code == 2 and "nope.jpg: no such image file" in result.output
    (tmp_path / "bad.png").write_text("not an image")
    result = predict(chain, "--head", chain["ids"]["train-head"], str(tmp_path / "bad.png"))
    assert result.exit_code == 2 and "not a readable image" in result.output


def test_prepare_image_geometry() -> None:
    rgb = np.arange(50 * 70 * 3, dtype=np.int64).reshape(50, 70, 3).astype(np.uint8)
    x, shown = prepare_image(rgb, 32, 16, full=False)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert shown.shape == (50, 50, 3)  # the outputs: the centre square at the image's own resolution
    big = np.zeros((1500, 2000, 3), np.uint8)
    assert prepare_image(big, 32, 16, full=False)[1].shape == (1024, 1024, 3)  # capped
    x, shown = prepare_image(rgb, 32, 16, full=True)
    assert x.shape == (3, 32, 48) and shown is rgb  # 70 * 32/50 = 44.8 → 48
    np.testing.assert_allclose(x[:, 0, 0] * np.array([0.229, 0.224, 0.225]) + [0.485, 0.456, 0.406],
                               rgb[0, 0] / 255, atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 16"):
        prepare_image(rgb, 24, 16, full=False)


def test_overlay_and_label_png(tmp_path: Path) -> None:
    rgb = np.full((2, 2, 3), 100, np.uint8)
    colours = np.array([[200, 0, 0], [0, 0, 0]], np.uint8)
    out = overlay(rgb, np.array([[0, -1], [0, 1]]), colours)
    assert out[0, 0].tolist() == [150, 50, 50] and out[0, 1].tolist() == [100, 100, 100]
    assert out[1, 1].tolist() == [100, 100, 100]  # id 1 is outside the 1-colour palette: image kept
    write_label_png(tmp_path / "a.png", np.array([[0, -1]]))
    assert label(tmp_path / "a.png").tolist() == [[0, 255]]
    write_label_png(tmp_path / "b.png", np.array([[300, -1]]))
    assert label(tmp_path / "b.png").astype(np.int64).tolist() == [[300, 65535]]


def test_panel_legend_names_classes_and_clusters() -> None:
    colours = palette(3)
    linear, cluster = np.array([[0, 1]]), np.array([[1, -1]])
    assert [name for name, _ in panel_legend(linear, cluster, colours, ["sky", "grass", "road"], True)] == \
        ["sky", "grass", "ignore / unmatched"]
    legend = panel_legend(linear, cluster, colours, ["sky", "grass", "road"], False)
    assert [name for name, _ in legend] == ["sky", "grass / cluster 1", "ignore / unmatched"]
    assert (legend[1][1] == colours[1]).all() and (legend[-1][1] == 0).all()


def test_imported_head_backbone_from_the_checkpoint_record(tmp_path: Path) -> None:
    head_id = "train-head-0123456789abcdef"
    folder = tmp_path / "train-head" / head_id
    folder.mkdir(parents=True)
    manifest = {"inputs": {}, "backbone": {"model_type": "vit_base", "patch": 8}}
    (folder / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    record = backbone_record(ArtifactStore(tmp_path), head_id)
    assert record == BackboneRecord("vit_base_patch8_224.dino", None, "dino", None)
    assert (record.patch, record.embed_dim) == (8, 768)
    random = load_config(None, []).backbone
    with pytest.raises(ConfigError, match="imported from a STEGO checkpoint"):
        check_weights(random, record)
    weights = tmp_path / "vitb8.pth"
    weights.write_bytes(b"x")
    assert check_weights(load_config(None, [f"backbone.weights={weights}"]).backbone, record).startswith("file:")
