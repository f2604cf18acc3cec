"""evaluate stage: perfect codes score 100 mIoU, CRF on/off, pool = serial, resume, extra clusters,
failures publish nothing, and the whole chain on the synthetic demo with a random tiny ViT."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import stages.evaluate as evaluate
from pipeline.artifacts import ArtifactStore
from pipeline.errors import ConfigError, InputError, StageError
from pipeline.planner import Request
from stages.evaluate import upsampled_codes
from stages.evaluation.figures import colorize, palette
from stages.projections import IdentityProjection
from tests.test_probe import config, onehot, onehot_requests, run_request  # noqa: F401

torch.set_num_threads(1)


def _metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())


def _evaluate(*overrides: str, **kwargs: Any) -> Path:
    return run_request(onehot_requests(config("probe.cluster_fit=kmeans", *overrides), **kwargs)["evaluate"])


def test_perfect_codes_score_100_miou(onehot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[list, list, str]] = []
    real_save = evaluate.save_panels

    def save_panels(path: Path, panels: list, legend: list, title: str | None = None) -> None:
        drawn.append((panels, legend, title))
        real_save(path, panels, legend, title)

    monkeypatch.setattr(evaluate, "save_panels", save_panels)
    path = _evaluate("evaluate.examples=2")
    metrics = _metrics(path)
    for entry in ("linear", "cluster"):
        score = metrics["scores"][entry]
        assert score["miou"] == pytest.approx(100.0) and score["accuracy"] == pytest.approx(100.0), entry
        assert score["iou"] == score["precision"] == score["recall"] == [1.0, 1.0, 1.0]
    assert sorted(metrics["scores"]["cluster"]["assignment"]) == [0, 1, 2]
    assert set(metrics["scores"]) == {"linear", "cluster"}
    protocol = metrics["protocol"]
    store = ArtifactStore(onehot)
    assert protocol["probe_id"] in store.ids("probe") and protocol["tokens_id"].startswith("test-onehot-tokens-")
    assert protocol["index_id"] is None  # the hand-made tokens have no prepare input
    assert (protocol["crf"], protocol["crf_pixels"]) == (False, None)
    assert (protocol["flip_tta"], protocol["split"]) == (False, "val")
    assert (protocol["resolution"], protocol["feature_grid"]) == ([8, 8], [4, 4])
    assert (protocol["n_classes"], protocol["n_clusters"], protocol["seed"], protocol["n_images"]) == (3, 3, 0, 8)
    assert protocol["projection"] == {"method": "identity", "id": None, "kind": "identity", "dim": 6,
                                      "requested_dim": None}
    confusion = np.load(path / "confusion_linear.npy")
    assert confusion.dtype == np.int64 and confusion.sum() == 8 * (64 - 3)  # 3 ignored pixels per image
    assert np.count_nonzero(confusion - np.diag(np.diag(confusion))) == 0
    pngs = sorted((path / "examples").glob("*.png"))
    assert [p.name for p in pngs] == ["0-val_0.png", "1-val_7.png"]
    with Image.open(pngs[0]) as png:
        assert png.info["dpi"][0] == pytest.approx(150, abs=1) and png.width >= 4 * 300
    panels, legend, title = drawn[0]
    assert [name for name, _ in panels] == ["image", "ground truth", "linear probe", "cluster probe"]
    image, label, linear, cluster = (x for _, x in panels)
    np.testing.assert_array_equal(label[1:], linear[1:])  # linear = label (row 0 is ignored)
    np.testing.assert_array_equal(linear, cluster)  # matched clusters = linear
    assert [name for name, _ in legend][-1] == "ignore / unmatched"  # the ignored row 0 of the label
    assert {name for name, _ in legend[:-1]} <= {"a", "b", "c"}  # the class names of the probes
    colours = palette(3)
    assert all(any((colour == c).all() for c in colours) for _, colour in legend)
    assert title.startswith("val/0: onehot val, identity (dim 6)")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 8, "pixels": 8 * 61, "crf_failed": 0} and manifest["summary"]["cluster"]["miou"] == 100.0


def test_flip_tta_averages_the_mirrored_code() -> None:
    tokens = torch.randn(2, 3, 4, 5)
    flipped = torch.randn(2, 3, 4, 5)
    out = upsampled_codes(IdentityProjection(5), tokens, (3, 4), flipped)
    expected = (tokens + flipped.flip(2)).permute(0, 3, 1, 2) / 2
    torch.testing.assert_close(out, expected)
    assert upsampled_codes(IdentityProjection(5), tokens, (6, 8)).shape == (2, 5, 6, 8)


def test_flip_tta_and_crf_on_perfect_codes(onehot: Path) -> None:
    off = _metrics(_evaluate("evaluate.flip_tta=true"))
    assert off["protocol"]["flip_tta"] is True and off["scores"]["linear"]["miou"] == pytest.approx(100.0)
    on = _evaluate("evaluate.flip_tta=true", "evaluate.crf=true", "evaluate.crf_workers=1")
    metrics = _metrics(on)
    assert set(metrics["scores"]) == {"linear", "cluster", "linear_crf", "cluster_crf"}
    assert metrics["protocol"]["crf"] is True and metrics["protocol"]["crf_pixels"] == "reference"
    for entry in ("linear_crf", "cluster_crf"):  # colour edges agree with the labels: CRF keeps them
        assert metrics["scores"][entry]["miou"] > 90.0, entry
        assert np.load(on / f"confusion_{entry}.npy").sum() == 8 * 61
    assert not (on / "crf_shards").exists()  # per-shard staging predictions are not published
    manifest = json.loads((on / "manifest.json").read_text())
    assert manifest["crf_failed"] == [] and manifest["throughput"]["crf_images_per_s"] > 0
    assert manifest["shards"] == {"computed": 2, "reused": 0}


def test_crf_pixel_mode_is_a_recorded_protocol_flag(onehot: Path) -> None:
    reference = _evaluate("evaluate.crf=true", "evaluate.crf_workers=1")
    raw = _evaluate("evaluate.crf=true", "evaluate.crf_workers=1", "evaluate.crf_pixels=raw")
    assert raw.name != reference.name  # a different image for the CRF is a different artifact
    assert _metrics(raw)["protocol"]["crf_pixels"] == "raw"
    assert _metrics(reference)["protocol"]["crf_pixels"] == "reference"
    plain = _evaluate()
    assert plain.name == _evaluate("evaluate.crf_pixels=raw").name  # without the CRF the mode changes nothing
    with pytest.raises(ConfigError, match="evaluate.crf_pixels='bgr'"):
        _evaluate("evaluate.crf=true", "evaluate.crf_pixels=bgr")


def test_the_crf_sees_the_reference_pixels(onehot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.evaluation import crf

    seen: list[str] = []
    real = crf.dense_crf

    def spy(image: Any, logits: Any, **kw: Any) -> np.ndarray:
        seen.append(kw["pixels"])
        return real(image, logits, **kw)

    monkeypatch.setattr(crf, "dense_crf", spy)
    _evaluate("evaluate.crf=true", "evaluate.crf_workers=1")
    assert seen and set(seen) == {"reference"}


@pytest.mark.slow  # spawns CRF workers that import torch (~10 s on 2 busy cores)
def test_crf_pool_and_serial_give_the_same_metrics(onehot: Path, tmp_path: Path) -> None:
    serial = _evaluate("evaluate.crf=true", "evaluate.crf_workers=1")
    pool = _evaluate("evaluate.crf=true", "evaluate.crf_workers=2", f"run.root={tmp_path / 'pool'}")
    assert pool.parent != serial.parent and pool.name == serial.name  # runtime settings keep the id
    assert _metrics(pool)["scores"] == _metrics(serial)["scores"]
    for entry in ("linear_crf", "cluster_crf"):
        np.testing.assert_array_equal(np.load(pool / f"confusion_{entry}.npy"), np.load(serial / f"confusion_{entry}.npy"))


def test_killed_crf_run_resumes_from_finished_shards(onehot: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    real = evaluate._save_shard
    saved: list[Path] = []

    def dies_on_second_shard(path: Path, preds: np.ndarray, failed: list) -> None:
        if saved:
            raise OSError("simulated crash while writing the second CRF shard")
        saved.append(path)
        real(path, preds, failed)

    monkeypatch.setattr(evaluate, "_save_shard", dies_on_second_shard)
    with pytest.raises(Exception, match="simulated crash"):
        _evaluate("evaluate.crf=true", "evaluate.crf_workers=1")
    assert ArtifactStore(onehot).ids("evaluate") == []  # a failed stage publishes nothing
    monkeypatch.setattr(evaluate, "_save_shard", real)
    resumed = _evaluate("evaluate.crf=true", "evaluate.crf_workers=1")
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["shards"] == {"computed": 1, "reused": 1}
    fresh = _evaluate("evaluate.crf=true", "evaluate.crf_workers=1", f"run.root={tmp_path / 'fresh'}")
    assert _metrics(resumed)["scores"] == _metrics(fresh)["scores"]


def test_failed_crf_images_keep_their_plain_prediction(onehot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.evaluation import crf

    real = crf.dense_crf

    def fails_on_blue_corner(image: Any, logits: Any, **kw: Any) -> np.ndarray:
        if tuple(image[7, 7]) == (40, 40, 200):  # class 2 in the bottom-right corner
            raise RuntimeError("unlucky image")
        return real(image, logits, **kw)

    monkeypatch.setattr(crf, "dense_crf", fails_on_blue_corner)
    path = _evaluate("evaluate.crf=true", "evaluate.crf_workers=1")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["crf_failed"], "the test data should contain an image the fake CRF rejects"
    assert all(f["error"] == "RuntimeError: unlucky image" for f in manifest["crf_failed"])
    assert {f["probe"] for f in manifest["crf_failed"]} == {"linear", "cluster"}
    assert _metrics(path)["scores"]["linear_crf"]["miou"] > 90.0
    assert manifest["counts"]["crf_failed"] == len(manifest["crf_failed"]) < 16

    def always_fails(image: Any, logits: Any, **kw: Any) -> np.ndarray:
        raise ImportError("No module named 'pydensecrf'")

    monkeypatch.setattr(crf, "dense_crf", always_fails)
    with pytest.raises(StageError, match="failed on every val image.*No module named 'pydensecrf'"):
        _evaluate("evaluate.crf=true", "evaluate.crf_workers=1", "evaluate.examples=1")


def test_extra_clusters_are_scored(onehot: Path) -> None:
    kept = _evaluate("probe.extra_clusters=2")
    metrics = _metrics(kept)
    assert metrics["protocol"]["n_clusters"] == 5
    assert np.load(kept / "confusion_cluster.npy").shape == (5, 3)
    assert np.load(kept / "confusion_linear.npy").shape == (3, 3)
    cluster = metrics["scores"]["cluster"]
    assert len(cluster["iou"]) == 3 and len(cluster["assignment"]) == 5
    assert sorted(cluster["assignment"]).count(-1) == 2 and cluster["miou"] == pytest.approx(100.0)
    dropped = _metrics(_evaluate("probe.extra_clusters=2", "evaluate.drop_extra_clusters=true"))
    assert dropped["protocol"]["drop_extra_clusters"] is True
    # reference scoring: an "Extra" class joins the per-class lists (NaN → null: no pixel went there)
    assert len(dropped["scores"]["cluster"]["iou"]) == 4 and dropped["scores"]["cluster"]["iou"][3] is None
    assert len(dropped["scores"]["linear"]["iou"]) == 3


def test_evaluate_errors_publish_nothing(onehot: Path) -> None:
    with pytest.raises(InputError, match="evaluate.crf=true needs array 'rgb'"):
        _evaluate("evaluate.crf=true", val_rgb=False)
    assert ArtifactStore(onehot).ids("evaluate") == []


def test_palette_is_fixed_and_distinct() -> None:
    colours = palette(27)
    assert colours.shape == (28, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 28 and tuple(colours[-1]) == (0, 0, 0)
    np.testing.assert_array_equal(palette(27)[:5], palette(5)[:5])
    ids = np.array([[0, 1], [-1, 99]])
    np.testing.assert_array_equal(colorize(ids, palette(5)), palette(5)[[[0, 1], [5, 5]]])


def test_demo_chain_synthetic_tiny_vit(root: Path) -> None:
    cfg = config("dataset.synthetic.n_train=4", "dataset.synthetic.n_val=2", "dataset.synthetic.height=40",
                 "dataset.synthetic.width=48", "backbone.name=vit_small_patch16_224.dino", "extract.train_res=32",
                 "extract.val_res=48", "probe.steps=5", "probe.batch_size=2", "evaluate.crf=true",
                 "evaluate.flip_tta=true", "evaluate.crf_workers=1", "evaluate.examples=1")
    path = run_request(Request("evaluate", cfg))
    metrics = _metrics(path)
    protocol = metrics["protocol"]
    assert protocol["index_id"].startswith("prepare-") and protocol["tokens_id"].startswith("extract-")
    assert protocol["dataset"] == "synthetic" and protocol["split"] == "val"
    assert protocol["resolution"] == [48, 48] and protocol["feature_grid"] == [3, 3]
    assert protocol["backbone"] == "vit_small_patch16_224.dino" and protocol["n_images"] == 2
    assert protocol["weights_tag"] == "random-seed0" and protocol["crf_pixels"] == "reference"
    assert protocol["projection"] == {"method": "identity", "id": None, "kind": "identity", "dim": 384,
                                     "requested_dim": None}
    assert protocol["class_names"] == ["sky", "grass", "road", "water", "object"]
    for entry in ("linear", "cluster", "linear_crf", "cluster_crf"):
        score = metrics["scores"][entry]
        assert 0.0 <= score["accuracy"] <= 100.0 and len(score["iou"]) == 5, entry
        assert np.load(path / f"confusion_{entry}.npy").sum() == 2 * 48 * 48
    assert len(list((path / "examples").glob("*.png"))) == 1
