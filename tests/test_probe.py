"""probe stage: fresh probes on cached tokens, the probe file format, params and determinism.

The tokens come from a hand-made ``tokens`` artifact (registered for the test only) whose tokens are
the one-hot vectors of the label at feature resolution, so a working probe stage must separate them
perfectly. :func:`onehot_requests` is shared with ``tests/test_evaluate.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import ArtifactError, ConfigError, InputError
from pipeline.context import StageContext
from pipeline.planner import Request, plan
from pipeline.registry import STAGES, register_stage
from pipeline.runner import run_tasks
from stages.evaluation.probes import ClusterProbe, LinearProbe, load_probes, save_probes
from stages.projections import IdentityProjection
from stages.store import create_token_store, open_token_store, write_shard

torch.set_num_threads(1)

ONEHOT = "test-onehot-tokens"
N_CLASSES, DIM, GRID, LABEL_HW, SHARD = 3, 6, (4, 4), (8, 8), 4
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)


def onehot_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Random 4×4 class grids; tokens = one-hot(grid) padded to DIM; labels = grid ×2 nearest, with a
    few ignored pixels; tokens_flip = tokens of the mirrored grid; rgb = one colour per class."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, N_CLASSES, (n, *GRID))
    eye = np.eye(DIM, dtype=np.float32)
    labels = grid.repeat(2, axis=1).repeat(2, axis=2).astype(np.int16)
    labels[:, 0, :3] = -1
    return {"tokens": eye[grid], "tokens_flip": eye[grid[:, :, ::-1]], "labels": labels,
            "rgb": np.where(labels[..., None] >= 0, COLOURS[labels.clip(0)], 128).astype(np.uint8)}


def _onehot_run(ctx: StageContext) -> None:
    split, n, rgb = ctx.args["split"], ctx.args["n"], ctx.args["rgb"]
    data = onehot_split(n, seed=0 if split == "train" else 1)
    attrs = {"dataset": "onehot", "split": split, "n_classes": N_CLASSES, "class_names": ["a", "b", "c"],
             "backbone": "none", "weights_tag": "none", "patch": 2, "res": LABEL_HW[0], "normalisation": "none"}
    path = ctx.out / "tokens.zarr"
    create_token_store(path, n=n, grid=GRID, dim=DIM, label_hw=LABEL_HW, shard_size=SHARD, with_rgb=rgb,
                       with_flip=True, attrs=attrs)
    for k, (a, b) in enumerate(open_token_store(path).shard_ranges()):
        write_shard(path, k, tokens=data["tokens"][a:b], labels=data["labels"][a:b],
                    tokens_flip=data["tokens_flip"][a:b], rgb=data["rgb"][a:b] if rgb else None,
                    ids=[f"{split}/{i}" for i in range(a, b)])


@pytest.fixture
def onehot(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Register the hand-made tokens stage for this test only; returns the artifact root."""
    monkeypatch.setitem(STAGES, ONEHOT, None)  # removed again at teardown
    register_stage(ONEHOT, kind="tokens",
                   args={"split": "train", "n": 12, "rgb": True})(_onehot_run)
    return root


def onehot_requests(cfg: Any, *, val_rgb: bool = True, n_val: int = 8) -> dict[str, Request]:
    """``probe`` and ``evaluate`` requests reading the hand-made tokens instead of ``extract``."""
    train = Request(ONEHOT, cfg, {"split": "train"})
    probe = Request("probe", cfg, extra_inputs={"tokens": train})
    val = Request(ONEHOT, cfg, {"split": "val", "n": n_val, "rgb": val_rgb})
    return {"probe": probe, "evaluate": Request("evaluate", cfg, extra_inputs={"tokens": val, "probes": probe})}


def run_request(request: Request) -> Path:
    tasks, targets = plan([request])
    results = run_tasks(tasks, request.cfg.run)
    return next(r.path for r in results if r.id == targets[0])


def config(*overrides: str) -> Any:
    return load_config(None, ["run.executor=local", "run.device=cpu", "probe.steps=100", "probe.batch_size=4", "probe.lr=0.05",
                              *overrides])


@pytest.mark.parametrize("fit", ["adam", "kmeans"])
def test_probes_separate_onehot_codes(onehot: Path, fit: str) -> None:
    path = run_request(onehot_requests(config(f"probe.cluster_fit={fit}"))["probe"])
    probes = load_probes(path)
    assert (probes.n_classes, probes.n_clusters, probes.dim) == (N_CLASSES, N_CLASSES, DIM)
    assert probes.meta["projection"] == {"kind": "identity", "in_dim": DIM, "dim": DIM}
    assert probes.meta["class_names"] == ["a", "b", "c"] and probes.meta["cluster_fit"] == fit
    codes = torch.eye(DIM)[:N_CLASSES].reshape(N_CLASSES, DIM, 1, 1)
    assert probes.linear.predict(codes).flatten().tolist() == [0, 1, 2]
    history = json.loads((path / "history.json").read_text())
    assert len(history["linear"]) == len(history["cluster"]) == 100
    assert history["linear"][-1] < 0.5 * history["linear"][0]
    if fit == "kmeans":  # k-means++ seeds one centroid per distinct direction: one cluster per class
        assert sorted(probes.cluster.predict(codes).flatten().tolist()) == [0, 1, 2]
    else:  # hard k-means by Adam from randn centroids may leave a centroid dead; it does descend
        assert history["cluster"][-1] < history["cluster"][0]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 100 and manifest["counts"]["train_samples"] == 12
    assert manifest["params"]["projection.seed"] == 0 and manifest["throughput"]["steps_per_s"] > 0


def test_probe_training_is_seeded(onehot: Path, tmp_path: Path) -> None:
    first = load_probes(run_request(onehot_requests(config("probe.steps=20"))["probe"]))
    again = load_probes(run_request(onehot_requests(config("probe.steps=20", f"run.root={tmp_path / 'b'}"))["probe"]))
    other = load_probes(run_request(onehot_requests(config("probe.steps=20", "projection.seed=1"))["probe"]))
    assert torch.equal(first.cluster.clusters, again.cluster.clusters)
    assert torch.equal(first.linear.weight, again.linear.weight)
    assert not torch.equal(first.cluster.clusters, other.cluster.clusters)


def test_probe_ids_follow_probe_settings_and_reject_bad_values(onehot: Path) -> None:
    def probe_id(*overrides: str) -> str:
        return plan([onehot_requests(config(*overrides))["probe"]])[1][0]

    base = probe_id()
    assert probe_id("evaluate.crf_workers=7", "run.workers=3") == base  # runtime settings
    for change in ("probe.steps=101", "probe.lr=0.005", "probe.extra_clusters=1", "probe.cluster_fit=kmeans",
                   "probe.batch_size=5", "projection.seed=3"):
        assert probe_id(change) != base, change
    with pytest.raises(ConfigError, match="probe.cluster_fit='kmedoids'"):
        probe_id("probe.cluster_fit=kmedoids")
    with pytest.raises(ConfigError, match="probe.extra_clusters"):
        probe_id("probe.extra_clusters=-1")


def test_extra_clusters_are_saved(onehot: Path) -> None:
    probes = load_probes(run_request(onehot_requests(config("probe.extra_clusters=2", "probe.steps=5"))["probe"]))
    assert (probes.n_classes, probes.n_clusters) == (N_CLASSES, N_CLASSES + 2)


def test_probe_files_round_trip_and_reject_corrupt_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    linear, cluster = LinearProbe(4, 3), ClusterProbe(4, 5)
    save_probes(tmp_path / "p", linear, cluster, class_names=["x", "y", "z"], projection=IdentityProjection(4),
                extra={"note": "hi"})
    probes = load_probes(tmp_path / "p")
    assert torch.equal(probes.linear.weight, linear.weight) and torch.equal(probes.linear.bias, linear.bias)
    assert torch.equal(probes.cluster.clusters, cluster.clusters)
    assert probes.meta["note"] == "hi" and probes.meta["n_clusters"] == 5
    with pytest.raises(InputError, match="class names"):
        save_probes(tmp_path / "q", linear, cluster, class_names=["x"], projection=IdentityProjection(4))
    with pytest.raises(InputError, match="projection dim 5"):
        save_probes(tmp_path / "q", linear, cluster, class_names=["x", "y", "z"], projection=IdentityProjection(5))
    meta = json.loads((tmp_path / "p" / "probes.json").read_text())
    (tmp_path / "p" / "probes.json").write_text(json.dumps({**meta, "dim": 3}))
    with pytest.raises(ArtifactError, match="do not match"):
        load_probes(tmp_path / "p")
    with pytest.raises(ArtifactError, match="holds no probes"):
        load_probes(tmp_path / "missing")


def test_probe_stage_failure_publishes_nothing(onehot: Path) -> None:
    # k-means++ must seed 23 centroids from the first batch, which holds 1 sample × 16 tokens
    cfg = config("probe.cluster_fit=kmeans", "probe.batch_size=1", "probe.extra_clusters=20")
    with pytest.raises(InputError, match="fewer than the 23 clusters"):
        run_request(onehot_requests(cfg)["probe"])
    assert ArtifactStore(onehot).ids("probe") == []
