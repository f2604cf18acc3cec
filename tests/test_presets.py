"""Dataset presets = the paper's Table 1 ("Actual" configuration of the released STEGO checkpoints)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.planner import Request, plan
from stages.backbones import BACKBONES
from stages.datasets.cityscapes import CityscapesReader
from stages.datasets.cocostuff import CocoStuff27Reader
from stages.datasets.potsdam import PotsdamReader
from stages.evaluation.probes import PROBE_LR
from pipeline.registry import get_stage, id_params

# Koenig et al. (CVPRW 2023), Table 1, "Actual" columns, as printed (λ and b rounded to 2 decimals;
# "-" = not available in the checkpoint: STEGO's default applies).
PAPER_TABLE_1 = {
    "cocostuff27": {"steps": 7000, "batch": 32, "crop": "five", "backbone": "ViT-B", "zero_clamp": None,
                    "pointwise": True, "dim": 90, "lambda_rand": 0.15, "lambda_knn": 1.00, "lambda_self": 0.10,
                    "b_rand": 1.00, "b_knn": 0.20, "b_self": 0.12},
    "cityscapes": {"steps": 7000, "batch": 32, "crop": "five", "backbone": "ViT-B", "zero_clamp": None,
                   "pointwise": False, "dim": 100, "lambda_rand": 0.91, "lambda_knn": 0.58, "lambda_self": 1.00,
                   "b_rand": 0.31, "b_knn": 0.18, "b_self": 0.46},
    "potsdam": {"steps": 5000, "batch": 16, "crop": "none", "backbone": "ViT-S", "zero_clamp": True,
                "pointwise": True, "dim": 70, "lambda_rand": 0.63, "lambda_knn": 0.25, "lambda_self": 0.67,
                "b_rand": 0.76, "b_knn": 0.02, "b_self": 0.08},
}
# Supplementary Table 1: shared by all datasets.
PAPER_SUPPLEMENT = {"extra_clusters": 0, "probe_lr": 0.005, "head_lr": 0.0005, "dropout": 0.1,
                    "feature_samples": 11, "neg_samples": 5}
# Unrounded values stored in the checkpoints (method.md §3.6), plus classes and patch size.
EXACT = {
    "cocostuff27": {"weights": {"neg": 0.1538476246415498, "inter": 1.0, "intra": 0.1},
                    "shifts": {"neg": 1.0, "inter": 0.2, "intra": 0.12}, "n_classes": 27},
    "cityscapes": {"weights": {"neg": 0.9058762625226623, "inter": 0.577453483136995, "intra": 1.0},
                   "shifts": {"neg": 0.31361241889448443, "inter": 0.1754346515479633, "intra": 0.45828472207},
                   "n_classes": 27},
    "potsdam": {"weights": {"neg": 0.63, "inter": 0.25, "intra": 0.67},
                "shifts": {"neg": 0.76, "inter": 0.02, "intra": 0.08}, "n_classes": 3},
}
READERS = {"cocostuff27": CocoStuff27Reader, "cityscapes": CityscapesReader, "potsdam": PotsdamReader}
FOLDERS = {"cocostuff27": "cocostuff", "cityscapes": "cityscapes", "potsdam": "potsdam"}
WIDTH = {"ViT-B": 768, "ViT-S": 384}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE_1))
def test_preset_is_the_paper_configuration(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEGOPIPE_DATA_ROOT", raising=False)
    paper, exact = PAPER_TABLE_1[name], EXACT[name]
    cfg = load_config(name)
    assert cfg.dataset.root == f"data/{FOLDERS[name]}"
    head = cfg.head
    assert cfg.dataset.name == name and cfg.dataset.train_crop == paper["crop"]
    backbone = BACKBONES[cfg.backbone.name]
    assert (backbone.family, backbone.embed_dim, backbone.patch) == ("dino", WIDTH[paper["backbone"]], 8)
    assert cfg.backbone.weights == "dino"
    assert (cfg.extract.train_res, cfg.extract.val_res) == (224, 320)
    assert READERS[name].n_classes == exact["n_classes"]

    assert (head.steps, head.batch_size, head.dim, head.pointwise) == (
        paper["steps"], paper["batch"], paper["dim"], paper["pointwise"])
    assert (cfg.probe.steps, cfg.probe.batch_size) == (paper["steps"], paper["batch"])
    assert head.zero_clamp is (True if paper["zero_clamp"] is None else paper["zero_clamp"])
    assert not head.stabilize and head.projection == "nonlinear" and head.num_neighbors == 7
    for symbol, part in (("rand", "neg"), ("knn", "inter"), ("self", "intra")):
        assert head.weights[part] == pytest.approx(paper[f"lambda_{symbol}"], abs=0.005)
        assert head.shifts[part] == pytest.approx(paper[f"b_{symbol}"], abs=0.005)
        assert head.weights[part] == exact["weights"][part]
        assert head.shifts[part] == exact["shifts"][part]

    supplement = {"extra_clusters": head.extra_clusters, "probe_lr": cfg.probe.lr, "head_lr": head.lr,
                  "dropout": head.dropout, "feature_samples": head.feature_samples, "neg_samples": head.neg_samples}
    assert supplement == PAPER_SUPPLEMENT and PROBE_LR == PAPER_SUPPLEMENT["probe_lr"]
    assert cfg.probe.extra_clusters == 0
    assert head.selection == "best_val_cluster_miou" and head.val_every == 100

    params = id_params(get_stage("train-head"), cfg, {})
    assert params["dim"] == paper["dim"]
    assert {k: params[f"head.weights.{k}"] for k in exact["weights"]} == exact["weights"]


def test_defaults_are_stego_train_config_not_a_paper_model() -> None:
    """Without a preset, head.* are STEGO's train_config.yml values (method.md §3.5), which match no paper model."""
    head = load_config(None).head
    assert (head.dim, head.steps, head.batch_size, head.lr) == (70, 5000, 16, 5e-4)
    assert dict(head.weights) == {"intra": 0.67, "inter": 0.25, "neg": 0.63}
    assert dict(head.shifts) == {"intra": 0.18, "inter": 0.12, "neg": 0.46}
    assert (head.feature_samples, head.neg_samples, head.num_neighbors, head.selection) == (11, 5, 7, "last")


@pytest.mark.parametrize("name", sorted(PAPER_TABLE_1))
def test_preset_plans_the_stego_chain_from_the_data_root(name: str, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """The data root comes from STEGOPIPE_DATA_ROOT (make DATA_ROOT=...); the whole train-head chain plans."""
    monkeypatch.setenv("STEGOPIPE_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("STEGOPIPE_WEIGHTS_DIR", str(tmp_path))
    cfg = load_config(name)
    assert cfg.dataset.root == f"{tmp_path}/{FOLDERS[name]}"
    with pytest.raises(ConfigError, match="dino"):  # no official DINO file in the empty weights folder
        plan([Request("train-head", cfg)])
    tasks, _ = plan([Request("train-head", load_config(name, ["backbone.weights=random"]))])
    assert sorted(t.stage for t in tasks) == ["extract", "extract", "knn", "prepare", "prepare", "train-head"]
