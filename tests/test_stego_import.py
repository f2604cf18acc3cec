"""import-stego / head.checkpoint: a released STEGO checkpoint (method.md §11 layout) as a train-head artifact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from pipeline.artifacts import ArtifactStore, artifact_id, sha256_file
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.planner import Request, plan
from pipeline.registry import get_stage, stage_code, stage_fingerprint
from pipeline.runner import run_tasks
from pipeline.specs import validate
from stages.evaluation.probes import load_probes
from stages.projections.select import open_projection
from stages.stego.head import StegoHead

D, DIM, N = 16, 6, 3


def _checkpoint(projection: str | None = "nonlinear") -> dict:
    """A Lightning checkpoint dict in the layout of method.md §11 (tiny ViT part, real head/probe shapes)."""
    torch.manual_seed(0)
    cfg = OmegaConf.create({"model_type": "vit_small", "dino_patch_size": 8, "dim": DIM,
                            "projection_type": projection or "nonlinear", "extra_clusters": 0,
                            "dataset_name": "potsdam", "pointwise": True, "neg_inter_shift": 0.76,
                            "pos_inter_shift": 0.02, "pos_intra_shift": 0.08, "max_steps": 5000})
    width = DIM if projection else D
    state = {"net.model.norm.weight": torch.ones(D), "net.model.norm.bias": torch.zeros(D),
             "net.model.patch_embed.proj.weight": torch.randn(D, 3, 8, 8)}
    if projection:
        state.update({f"net.{k}": v for k, v in StegoHead(D, DIM, projection).state_dict().items()})
    state.update({"cluster_probe.clusters": torch.randn(N, width), "linear_probe.weight": torch.randn(N, width, 1, 1),
                  "linear_probe.bias": torch.randn(N), "train_cluster_probe.clusters": torch.randn(N, width),
                  "decoder.weight": torch.randn(D, width, 1, 1), "decoder.bias": torch.randn(D)})
    return {"epoch": 9, "global_step": 5000, "pytorch-lightning_version": "1.5.10", "state_dict": state,
            "hyper_parameters": {"n_classes": N, "cfg": cfg}}


def _save(tmp_path: Path, ckpt: dict, name: str = "potsdam_test.ckpt") -> Path:
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


def test_import_creates_a_content_addressed_head_artifact(root: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint()
    path = _save(tmp_path, ckpt)
    result = _invoke("import-stego", str(path))
    assert result.exit_code == 0, result.output
    artifact = result.stdout.strip().splitlines()[-1]
    stage = get_stage("train-head")
    code = stage_code(stage, stage_fingerprint(stage).digest)
    assert artifact == artifact_id("train-head", code, {"imported": sha256_file(path)}, {})
    store = ArtifactStore(root)
    out = store.path(artifact)
    validate("head", out)

    state = ckpt["state_dict"]
    weights = load_file(str(out / "head.safetensors"))
    assert set(weights) == {k[4:] for k in state if k.startswith("net.cluster")}
    for key, value in weights.items():
        assert torch.equal(torch.from_numpy(value), state[f"net.{key}"])
    probes = load_probes(out / "probes")
    assert torch.equal(probes.linear.weight.detach()[:, :, 0, 0], state["linear_probe.weight"][:, :, 0, 0])
    assert torch.equal(probes.linear.bias.detach(), state["linear_probe.bias"])
    assert torch.equal(probes.cluster.clusters.detach(), state["cluster_probe.clusters"])
    assert probes.meta["class_names"] == ["roads and cars", "buildings and clutter", "trees and vegetation"]

    reference = StegoHead(D, DIM)
    reference.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.cluster")})
    feats = torch.randn(2, D, 3, 3)
    torch.testing.assert_close(open_projection(out, D, None).transform_map(feats), reference.code(feats))

    cfg = OmegaConf.to_container(ckpt["hyper_parameters"]["cfg"])
    assert json.loads((out / "stego_cfg.json").read_text()) == cfg
    manifest = store.manifest(artifact)
    assert manifest["stego_cfg"] == cfg and manifest["params"] == {"imported": sha256_file(path)}
    assert manifest["inputs"] == {} and manifest["checkpoint"]["global_step"] == 5000
    assert json.loads((out / "head.json").read_text())["source"] == "imported"

    again = _invoke("import-stego", str(path))
    assert again.stdout.strip().splitlines()[-1] == artifact and "already imported" in again.stderr

    cfg = load_config(None, ["run.executor=local", f"head.checkpoint={path}", "head.dim=90"])
    tasks, targets = plan([Request("train-head", cfg)])
    assert targets == [artifact] and [t.stage for t in tasks] == ["train-head"]
    assert [r.status for r in run_tasks(tasks, cfg.run)] == ["hit"]


def test_unknown_and_missing_keys_are_listed(root: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint()
    ckpt["state_dict"]["net.extra_branch.weight"] = torch.zeros(2)
    ckpt["state_dict"]["segmentation_head.bias"] = torch.zeros(2)
    path = _save(tmp_path, ckpt, "odd.ckpt")
    result = CliRunner().invoke(main, ["import-stego", str(path)])
    assert result.exit_code == 2
    assert "net.extra_branch.weight" in result.stderr and "segmentation_head.bias" in result.stderr
    assert not ArtifactStore(root).ids("train-head")  # nothing published
    forced = _invoke("import-stego", str(path), "--ignore-unknown-keys")
    assert forced.exit_code == 0
    manifest = ArtifactStore(root).manifest(forced.stdout.strip().splitlines()[-1])
    assert manifest["ignored_unknown_keys"] == ["net.extra_branch.weight", "segmentation_head.bias"]

    broken = _checkpoint()
    del broken["state_dict"]["linear_probe.bias"], broken["state_dict"]["cluster_probe.clusters"]
    cfg = load_config(None, ["run.executor=local", f"head.checkpoint={_save(tmp_path, broken, 'broken.ckpt')}"])
    tasks, _ = plan([Request("train-head", cfg)])
    with pytest.raises(InputError, match=r"state_dict\.cluster_probe\.clusters.*state_dict\.linear_probe\.bias"):
        run_tasks(tasks, cfg.run)


def test_dino_baseline_and_missing_files_are_refused(root: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ["run.executor=local", f"head.checkpoint={_save(tmp_path, _checkpoint(None))}"])
    tasks, _ = plan([Request("train-head", cfg)])
    with pytest.raises(InputError, match="DINO-baseline"):
        run_tasks(tasks, cfg.run)
    with pytest.raises(InputError, match="no such checkpoint file"):
        plan([Request("train-head", load_config(None, [f"head.checkpoint={tmp_path / 'absent.ckpt'}"]))])


def test_zero_stride_tensors_are_refused_and_nothing_is_written(root: Path, tmp_path: Path) -> None:
    """Issue 19 item 5: tensors that claim more elements than their storage (a 2.7 KB file writing GBs)."""
    ckpt = _checkpoint()
    ckpt["state_dict"]["net.cluster1.0.weight"] = torch.zeros(1).expand(DIM, D, 1, 1)  # right shape, 1 stored value
    path = _save(tmp_path, ckpt, "strided.ckpt")
    result = CliRunner().invoke(main, ["import-stego", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "state_dict.net.cluster1.0.weight claims shape" in errors[0] and str(path) in errors[0]
    assert not ArtifactStore(root).ids("train-head")  # nothing published
