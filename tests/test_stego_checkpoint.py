"""STEGO checkpoint import (method.md §11): layout conversion and refusal to run code from the file."""
from __future__ import annotations

import base64
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.errors import InputError
from stages.stego.checkpoint import read_stego_checkpoint
from stages.stego.head import StegoHead

D, DIM, N = 8, 4, 3


def _vit_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 5, D),
        "patch_embed.proj.weight": (D, 3, 8, 8),
        "patch_embed.proj.bias": (D,),
        "blocks.0.norm1.weight": (D,),
        "blocks.0.attn.qkv.weight": (3 * D, D),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _checkpoint(projection: str | None = "nonlinear", **cfg_overrides) -> dict:
    torch.manual_seed(0)
    cfg = OmegaConf.create(
        {
            "model_type": "vit_small",
            "dino_patch_size": 8,
            "dim": DIM,
            "projection_type": projection or "nonlinear",
            "extra_clusters": 0,
            "dataset_name": "potsdam",
            "pointwise": True,
            "neg_inter_shift": 0.76,
            "lr": 5e-4,
            "continuous": True,
            "azureml_logging": None,
            "tags": ["a", 1, 2.5, False],
            "nested": {"crop": {"ratio": 0.5}},
            **cfg_overrides,
        }
    )
    width = DIM if projection else D
    state: dict[str, torch.Tensor] = {f"net.model.{k}": v for k, v in _vit_state().items()}
    if projection:
        state.update({f"net.{k}": v for k, v in StegoHead(D, DIM, projection).state_dict().items()})
    state.update(
        {
            "cluster_probe.clusters": torch.randn(N, width),
            "linear_probe.weight": torch.randn(N, width, 1, 1),
            "linear_probe.bias": torch.randn(N),
            "train_cluster_probe.clusters": torch.randn(N, width),
            "decoder.weight": torch.randn(D, width, 1, 1),
            "decoder.bias": torch.randn(D),
            "test_cluster_metrics.stats": torch.zeros(N, N),
            "some_new_module.weight": torch.zeros(2),
        }
    )
    adam = {  # the shape of an Adam state dict after one step (built by hand: a real step imports a lot)
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3)}},
        "param_groups": [
            {"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
             "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
             "fused": None, "params": [0]}
        ],
    }
    return {
        "epoch": 2,
        "global_step": 1199,
        "pytorch-lightning_version": "1.5.10",
        "state_dict": state,
        "callbacks": {"ModelCheckpoint{'monitor': 'test/cluster/mIoU'}": {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [adam] * 3,
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"n_classes": N, "cfg": cfg},
    }


def _save(tmp_path: Path, obj, name: str = "model.ckpt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_nonlinear_head_checkpoint_converts(tmp_path):
    ckpt = _checkpoint()
    path = _save(tmp_path, ckpt)
    got = read_stego_checkpoint(path)
    state = ckpt["state_dict"]
    assert (got.n_classes, got.extra_clusters, got.dim, got.feature_dim) == (N, 0, DIM, D)
    assert (got.projection, got.backbone, got.patch_size, got.dataset_name) == ("nonlinear", "vit_small", 8, "potsdam")
    assert (got.epoch, got.global_step, got.lightning_version) == (2, 1199, "1.5.10")
    assert got.unknown_keys == ("some_new_module.weight",)
    assert type(got.cfg) is dict and type(got.cfg["nested"]) is dict and type(got.cfg["tags"]) is list
    assert got.cfg["neg_inter_shift"] == 0.76 and got.cfg["tags"] == ["a", 1, 2.5, False]

    head = StegoHead(got.feature_dim, got.dim, got.projection)
    head.load_state_dict(got.head_state, strict=True)
    feats = torch.randn(1, D, 2, 2)
    reference = StegoHead(D, DIM)
    reference.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.cluster")})
    torch.testing.assert_close(head.code(feats), reference.code(feats))

    assert got.linear_probe["weight"].shape == (N, DIM)
    assert torch.equal(got.linear_probe["weight"], state["linear_probe.weight"][:, :, 0, 0])
    assert torch.equal(got.linear_probe["bias"], state["linear_probe.bias"])
    assert torch.equal(got.cluster_centroids, state["cluster_probe.clusters"])
    assert set(got.backbone_state) == set(_vit_state())
    for key, value in _vit_state().items():
        assert torch.equal(got.backbone_state[key], value)


def test_linear_head_and_extra_clusters(tmp_path):
    ckpt = _checkpoint("linear", extra_clusters=2)
    ckpt["state_dict"]["cluster_probe.clusters"] = torch.randn(N + 2, DIM)
    got = read_stego_checkpoint(_save(tmp_path, ckpt))
    assert got.projection == "linear" and set(got.head_state) == {"cluster1.0.weight", "cluster1.0.bias"}
    assert got.extra_clusters == 2 and got.cluster_centroids.shape == (N + 2, DIM)


def test_dino_baseline_checkpoint_has_no_head(tmp_path):
    got = read_stego_checkpoint(_save(tmp_path, _checkpoint(projection=None)))
    assert got.head_state is None and got.projection is None
    assert got.dim == got.feature_dim == D
    assert got.linear_probe["weight"].shape == (N, D)


def test_backbone_inferred_from_tensors_when_cfg_lacks_it(tmp_path):
    ckpt = _checkpoint()
    for key in ("model_type", "dino_patch_size"):
        del ckpt["hyper_parameters"]["cfg"][key]
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("net.model.")}
    ckpt["state_dict"]["net.model.patch_embed.proj.weight"] = torch.zeros(D, 3, 16, 16)
    with pytest.raises(InputError, match="cannot tell the backbone"):  # width 8 is no known ViT
        read_stego_checkpoint(_save(tmp_path, ckpt))
    ckpt["hyper_parameters"]["cfg"]["model_type"] = "vit_base"
    got = read_stego_checkpoint(_save(tmp_path, ckpt))
    assert (got.backbone, got.patch_size) == ("vit_base", 16)


def test_missing_required_keys_are_all_listed(tmp_path):
    ckpt = _checkpoint()
    del ckpt["hyper_parameters"]
    del ckpt["state_dict"]["linear_probe.bias"]
    del ckpt["state_dict"]["cluster_probe.clusters"]
    path = _save(tmp_path, ckpt, "broken.ckpt")
    with pytest.raises(InputError) as err:
        read_stego_checkpoint(path)
    message = str(err.value)
    assert "broken.ckpt" in message
    for key in ("hyper_parameters", "state_dict.linear_probe.bias", "state_dict.cluster_probe.clusters"):
        assert key in message


def test_partial_head_is_refused(tmp_path):
    ckpt = _checkpoint()
    del ckpt["state_dict"]["net.cluster2.2.bias"]
    with pytest.raises(InputError, match=r"cluster2\.2\.bias"):
        read_stego_checkpoint(_save(tmp_path, ckpt))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda c: c["hyper_parameters"].update(n_classes=5), "n_classes=5"),
        (lambda c: c["hyper_parameters"]["cfg"].update(projection_type="linear"), "projection_type"),
        (lambda c: c["hyper_parameters"]["cfg"].update(dino_patch_size=16), "dino_patch_size=16"),
        (lambda c: c["state_dict"].update({"cluster_probe.clusters": torch.zeros(N, DIM + 1)}), "width"),
    ],
)
def test_inconsistent_checkpoints_are_refused(tmp_path, mutate, pattern):
    ckpt = _checkpoint()
    mutate(ckpt)
    with pytest.raises(InputError, match=pattern):
        read_stego_checkpoint(_save(tmp_path, ckpt))


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


@pytest.mark.parametrize("kind", ["system", "exec"])
@pytest.mark.parametrize("where", ["state_dict", "hyper_parameters"])
def test_code_in_the_pickle_never_runs(tmp_path, kind, where):
    marker = tmp_path / "marker"
    payload = _System(f"touch {marker}") if kind == "system" else _Exec(f"open({str(marker)!r}, 'w').close()")
    ckpt = _checkpoint()
    ckpt[where]["payload"] = payload
    path = _save(tmp_path, ckpt, "evil.ckpt")
    with pytest.raises(InputError, match="evil.ckpt.*refused"):
        read_stego_checkpoint(path)
    assert not marker.exists()


def test_old_lightning_callback_class_key_is_inert(tmp_path, monkeypatch):
    # Lightning < 1.5 keyed ``callbacks`` by the callback class itself; fake that module to write such a pickle.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    ckpt = _checkpoint()
    ckpt["callbacks"] = {cls: {"best_model_score": torch.tensor(0.4)}}
    path = _save(tmp_path, ckpt)
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    got = read_stego_checkpoint(path)
    assert got.n_classes == N
    assert "pytorch_lightning" not in sys.modules


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint file"):
        read_stego_checkpoint(tmp_path / "absent.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="junk.ckpt"):
        read_stego_checkpoint(junk)
    with pytest.raises(InputError, match="top level"):
        read_stego_checkpoint(_save(tmp_path, [1, 2, 3], "list.ckpt"))


# ``pickle.dumps({"state_dict": {}, "hyper_parameters": {"n_classes": 27, "cfg": cfg}}, protocol=2)`` made
# with omegaconf 2.1.1 (the STEGO era),
# cfg = {model_type: vit_base, dino_patch_size: 8, dim: 90, tags: [1, 2.5, null, true]}.
OMEGACONF_21_PICKLE = base64.b64decode(
    "gAJ9cQAoWAoAAABzdGF0ZV9kaWN0cQF9cQJYEAAAAGh5cGVyX3BhcmFtZXRlcnNxA31xBChYCQAAAG5fY2xhc3Nlc3EFSxtY"
    "AwAAAGNmZ3EGY29tZWdhY29uZi5kaWN0Y29uZmlnCkRpY3RDb25maWcKcQcpgXEIfXEJKFgJAAAAX21ldGFkYXRhcQpjb21l"
    "Z2Fjb25mLmJhc2UKQ29udGFpbmVyTWV0YWRhdGEKcQspgXEMfXENKFgIAAAAcmVmX3R5cGVxDmN0eXBpbmcKQW55CnEPWAsA"
    "AABvYmplY3RfdHlwZXEQTlgIAAAAb3B0aW9uYWxxEYhYAwAAAGtleXESTlgFAAAAZmxhZ3NxE31xFFgKAAAAZmxhZ3Nfcm9v"
    "dHEViVgOAAAAcmVzb2x2ZXJfY2FjaGVxFmNjb2xsZWN0aW9ucwpkZWZhdWx0ZGljdApxF2NfX2J1aWx0aW5fXwpkaWN0CnEY"
    "hXEZUnEaWAgAAABrZXlfdHlwZXEbaA9YDAAAAGVsZW1lbnRfdHlwZXEcaA91YlgHAAAAX3BhcmVudHEdTlgIAAAAX2NvbnRl"
    "bnRxHn1xHyhYCgAAAG1vZGVsX3R5cGVxIGNvbWVnYWNvbmYubm9kZXMKQW55Tm9kZQpxISmBcSJ9cSMoaApjb21lZ2Fjb25m"
    "LmJhc2UKTWV0YWRhdGEKcSQpgXElfXEmKGgOaA9oEE5oEYhoEmggaBN9cSdoFYloFmgXaBiFcShScSl1YmgdaAhYBAAAAF92"
    "YWxxKlgIAAAAdml0X2Jhc2VxK3ViWA8AAABkaW5vX3BhdGNoX3NpemVxLGghKYFxLX1xLihoCmgkKYFxL31xMChoDmgPaBBO"
    "aBGIaBJoLGgTfXExaBWJaBZoF2gYhXEyUnEzdWJoHWgIaCpLCHViWAMAAABkaW1xNGghKYFxNX1xNihoCmgkKYFxN31xOCho"
    "DmgPaBBOaBGIaBJoNGgTfXE5aBWJaBZoF2gYhXE6UnE7dWJoHWgIaCpLWnViWAQAAAB0YWdzcTxjb21lZ2Fjb25mLmxpc3Rj"
    "b25maWcKTGlzdENvbmZpZwpxPSmBcT59cT8oaApoCymBcUB9cUEoaA5oD2gQY19fYnVpbHRpbl9fCmxpc3QKcUJoEYhoEmg8"
    "aBN9cUNoFYloFmgXaBiFcURScUVoG2NfX2J1aWx0aW5fXwpsb25nCnFGaBxoD3ViaB1oCGgeXXFHKGghKYFxSH1xSShoCmgk"
    "KYFxSn1xSyhoDmgPaBBOaBGIaBJLAGgTfXFMaBWJaBZoF2gYhXFNUnFOdWJoHWg+aCpLAXViaCEpgXFPfXFQKGgKaCQpgXFR"
    "fXFSKGgOaA9oEE5oEYhoEksBaBN9cVNoFYloFmgXaBiFcVRScVV1YmgdaD5oKkdABAAAAAAAAHViaCEpgXFWfXFXKGgKaCQp"
    "gXFYfXFZKGgOaA9oEE5oEYhoEksCaBN9cVpoFYloFmgXaBiFcVtScVx1YmgdaD5oKk51YmghKYFxXX1xXihoCmgkKYFxX31x"
    "YChoDmgPaBBOaBGIaBJLA2gTfXFhaBWJaBZoF2gYhXFiUnFjdWJoHWg+aCqIdWJldWJ1dWJ1dS4="
)


def test_omegaconf_2_1_pickled_config_passes_the_allow_list(tmp_path):
    template = _save(tmp_path, {}, "template.ckpt")
    path = tmp_path / "old.ckpt"
    with zipfile.ZipFile(template) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, OMEGACONF_21_PICKLE if item.filename.endswith("/data.pkl") else zin.read(item))
    with pytest.raises(InputError) as err:  # it has no tensors, but the config was read, not refused
        read_stego_checkpoint(path)
    message = str(err.value)
    assert "refused" not in message and "hyper_parameters.cfg" not in message
    assert "state_dict.linear_probe.weight" in message


@pytest.mark.parametrize("key", ["linear_probe.weight", "net.model.pos_embed", "optimizer"])
def test_zero_stride_tensors_are_refused_before_use(tmp_path, key):
    """A tiny file whose tensors claim GBs through zero strides (issue 19 item 5) is refused, naming the tensor."""
    ckpt = _checkpoint()
    bomb = torch.zeros(1).expand(40_000, 40_000)  # 6.4 GB as float32, one element of storage
    if key == "optimizer":
        ckpt["optimizer_states"][0]["state"][0]["exp_avg"] = bomb
    else:
        ckpt["state_dict"][key] = bomb.reshape(40_000, 40_000, 1, 1) if key.endswith("weight") else bomb[None]
    path = _save(tmp_path, ckpt)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="claims shape .* over a storage of 4 bytes"):
        read_stego_checkpoint(path)


def test_a_damaged_tensor_record_is_refused_by_its_crc(tmp_path):
    path = _save(tmp_path, _checkpoint())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor record
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"record '{info.filename}' fails its crc32"):
        read_stego_checkpoint(path)


def test_a_record_marked_as_a_folder_is_refused(tmp_path):
    """Found by the fuzzer: torch's zip reader reads a record whose central directory entry carries the
    MS-DOS folder bit as no bytes, so its tensor silently became zeros."""
    path = _save(tmp_path, _checkpoint())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(i.filename for i in archive.infolist() if "/data/" in i.filename)
    entry = data.index(b"PK\x01\x02")  # the first central directory entry
    while data[entry + 46: entry + 46 + len(name)] != name.encode():
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 38] |= 0x10  # external attributes: MS-DOS folder
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"record '{name}' is marked as a folder"):
        read_stego_checkpoint(path)
