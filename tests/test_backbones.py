"""Tests for stages/backbones.py: DINO ViT construction, weights loading, ``feat`` extraction (§1.1-§1.3, RV11)."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, InputError
from stages import backbones
from stages.backbones import BACKBONES, BackboneSpec, build_vit, dino_features, load_backbone, load_dino_state_dict

torch.set_num_threads(1)

D, DEPTH, HEADS, P = 32, 2, 2, 8  # tiny ViT, native grid 28x28 like ViT-*/8
TINY = "tiny_dino_test"


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vit(D, DEPTH, HEADS, P).eval()


def images(h: int, w: int, b: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_spec(monkeypatch: pytest.MonkeyPatch) -> BackboneSpec:
    spec = BackboneSpec(TINY, "dino", D, DEPTH, HEADS, P, "tiny_dino_pretrain.pth")
    monkeypatch.setitem(BACKBONES, TINY, spec)
    return spec


def official_dino_keys(depth: int) -> list[str]:
    """The key names of an official DINO ViT file (DINO's vision_transformer.py, num_classes=0)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return keys + ["norm.weight", "norm.bias"]


def dino_named_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a timm model's parameters to the official DINO names (by position in both lists)."""
    timm_sd = model.state_dict()
    official = official_dino_keys(DEPTH)
    timm_order = (
        ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
        + [k for k in timm_sd if k.startswith("blocks.")]
        + ["norm.weight", "norm.bias"]
    )
    return {o: timm_sd[t].clone() for o, t in zip(official, timm_order, strict=True)}


# ---- reference implementations written from the spec text (§1.3) -------------------------------


def ref_interpolate_pos_encoding(pos_embed: torch.Tensor, n_img_h: int, n_img_w: int, patch: int) -> torch.Tensor:
    """DINO: unchanged if grid == native and square; else bicubic with scale ((H/p+0.1)/g, (W/p+0.1)/g)."""
    n = pos_embed.shape[1] - 1
    g = int(round(n**0.5))
    h0, w0 = n_img_h // patch, n_img_w // patch
    if h0 * w0 == n and n_img_h == n_img_w:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / g, (w0 + 0.1) / g), mode="bicubic")
    assert grid.shape[-2:] == (h0, w0)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def manual_dino_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """patch embed → cat CLS → + interpolated pos → blocks → norm → drop CLS → [B, D, h, w]."""
    b, _, hh, ww = x.shape
    tok = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tok = torch.cat([model.cls_token.expand(b, -1, -1), tok], dim=1)
    tok = tok + ref_interpolate_pos_encoding(model.pos_embed, hh, ww, P)
    for blk in model.blocks:
        tok = blk(tok)
    tok = model.norm(tok)
    return tok[:, 1:].reshape(b, hh // P, ww // P, -1).permute(0, 3, 1, 2)


def hand_bicubic_1d_matrix(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
    """Interpolation matrix of PyTorch-style bicubic (A=-0.75, half-pixel, clamped border) for a given scale."""
    a = -0.75

    def cubic(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale_factor - 0.5
        base = int(np.floor(src))
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += cubic(src - k)
    return m


# ---- construction ---------------------------------------------------------------------------------


def test_build_vit_has_dino_hyper_parameters() -> None:
    m = tiny()
    assert tuple(m.pos_embed.shape) == (1, 1 + 28 * 28, D)
    assert tuple(m.cls_token.shape) == (1, 1, D)
    assert m.norm.eps == 1e-6 and all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in m.blocks)
    assert isinstance(m.blocks[0].mlp.act, torch.nn.GELU) and m.blocks[0].mlp.act.approximate == "none"
    assert m.blocks[0].mlp.fc1.out_features == 4 * D
    assert m.blocks[0].attn.qkv.bias is not None
    assert isinstance(m.head, torch.nn.Identity) and isinstance(m.fc_norm, torch.nn.Identity)
    assert m.dynamic_img_size and len(m.blocks) == DEPTH
    assert sorted(m.state_dict()) == sorted(official_dino_keys(DEPTH))


def test_backbone_table_names_files_and_urls() -> None:
    s8 = BACKBONES["vit_small_patch8_224.dino"]
    assert (s8.embed_dim, s8.depth, s8.num_heads, s8.patch) == (384, 12, 6, 8)
    assert s8.dino_url == (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"
    )
    b8 = BACKBONES["vit_base_patch8_224.dino"]
    assert (b8.embed_dim, b8.num_heads, b8.dino_file) == (768, 12, "dino_vitbase8_pretrain.pth")
    assert BACKBONES["vit_small_patch16_224.dino"].dino_file == "dino_deitsmall16_pretrain.pth"
    assert BACKBONES["vit_base_patch16_224.dino"].dino_file == "dino_vitbase16_pretrain.pth"
    v2 = BACKBONES["vit_small_patch14_dinov2.lvd142m"]
    assert v2.patch == 14 and v2.dino_file is None and v2.dino_url is None
    assert "vit_base_patch14_dinov2.lvd142m" in BACKBONES


# ---- features -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(224, 224), (320, 320), (224, 320), (160, 96)])
def test_feature_shapes(h: int, w: int) -> None:
    feats = dino_features(tiny(), images(h, w, b=2))
    assert feats.shape == (2, D, h // P, w // P) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("mode", ["dino", "timm"])
def test_features_equal_timm_forward_features_at_224(mode: str) -> None:
    m, x = tiny(), images(224, 224, b=2)
    ref = m.forward_features(x)[:, 1:].reshape(2, 28, 28, D).permute(0, 3, 1, 2)
    torch.testing.assert_close(dino_features(m, x, pos_interp=mode), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("h", "w"), [(320, 320), (224, 320)])
def test_dino_pos_interpolation_matches_manual_forward(h: int, w: int) -> None:
    m, x = tiny(), images(h, w)
    ref = manual_dino_forward(m, x)
    got = dino_features(m, x)
    assert (got - ref).abs().max().item() < 1e-5


def test_dino_pos_embed_uses_the_plus_0_1_scale() -> None:
    """Hand-written bicubic at scale (40+0.1)/28 reproduces the 40x40 pos-embed; scale 40/28 does not."""
    pos = tiny().pos_embed.detach()
    got = backbones._dino_pos_embed(pos, (28, 28), 40, 40)[0, 1:].reshape(40, 40, D).double().numpy()
    grid = pos[0, 1:].reshape(28, 28, D).double().numpy()
    m_dino = hand_bicubic_1d_matrix(28, 40, 40.1 / 28)
    want = np.einsum("ia,jb,abd->ijd", m_dino, m_dino, grid)
    assert np.abs(got - want).max() < 1e-5
    m_size = hand_bicubic_1d_matrix(28, 40, 40 / 28)
    assert np.abs(got - np.einsum("ia,jb,abd->ijd", m_size, m_size, grid)).max() > 1e-4
    torch.testing.assert_close(backbones._dino_pos_embed(pos, (28, 28), 28, 28), pos, rtol=0, atol=0)


def test_timm_resampling_differs_at_320_only() -> None:
    m, x = tiny(), images(320, 320)
    diff = (dino_features(m, x, pos_interp="dino") - dino_features(m, x, pos_interp="timm")).abs().max().item()
    assert diff > 1e-4
    x224 = images(224, 224)
    same = (dino_features(m, x224, pos_interp="dino") - dino_features(m, x224, pos_interp="timm")).abs().max()
    assert same.item() < 1e-6


def test_inference_mode_and_autocast() -> None:
    m, x = tiny(), images(160, 160)
    ref = dino_features(m, x)
    with torch.inference_mode():
        torch.testing.assert_close(dino_features(m, x), ref, rtol=0, atol=1e-6)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = dino_features(m, x)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert (low - ref).abs().max().item() < 0.2


def test_bad_image_sizes_and_modes() -> None:
    m = tiny()
    with pytest.raises(InputError, match="not divisible by the patch size"):
        dino_features(m, images(225, 224))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        dino_features(m, torch.zeros(3, 224, 224))
    with pytest.raises(ConfigError, match="pos_interp='bilinear'"):
        dino_features(m, images(224, 224), pos_interp="bilinear")  # type: ignore[arg-type]


# ---- state-dict loading ---------------------------------------------------------------------------


def _wrap(sd: dict[str, torch.Tensor], how: str) -> dict[str, object]:
    if how == "plain":
        return dict(sd)
    if how == "module":
        return {f"module.{k}": v for k, v in sd.items()}
    if how == "backbone":
        return {f"backbone.{k}": v for k, v in sd.items()}
    # a DINO training checkpoint: teacher = MultiCropWrapper(backbone, DINOHead), DDP-wrapped
    teacher: dict[str, object] = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(8, D)
    teacher["module.head.last_layer.weight_g"] = torch.ones(16, 1)
    return {"teacher": teacher, "student": {"module.backbone.cls_token": torch.zeros(1)}, "epoch": 3}


@pytest.mark.parametrize("how", ["plain", "module", "backbone", "teacher"])
def test_dino_state_dict_round_trip(how: str) -> None:
    src, dst, x = tiny(seed=1), tiny(seed=2), images(224, 224)
    assert (dino_features(src, x) - dino_features(dst, x)).abs().max() > 1e-3
    load_dino_state_dict(dst, _wrap(dino_named_state_dict(src), how))
    torch.testing.assert_close(dino_features(dst, x), dino_features(src, x), rtol=0, atol=0)


def test_missing_unexpected_and_shape_errors() -> None:
    m = tiny()
    sd = dino_named_state_dict(tiny(seed=1))
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(InputError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]"):
        load_dino_state_dict(m, missing)
    with pytest.raises(InputError, match=r"unexpected keys \['head.weight'\]"):
        load_dino_state_dict(m, {**sd, "head.weight": torch.zeros(3, D)})
    bad = {**sd, "pos_embed": torch.zeros(1, 197, D)}
    with pytest.raises(InputError, match=r"'pos_embed' has shape \[1, 197, 32\]"):
        load_dino_state_dict(m, bad, source="ckpt.pth")
    with pytest.raises(InputError, match="expected a dict of tensors"):
        load_dino_state_dict(m, [1, 2])  # type: ignore[arg-type]


# ---- load_backbone --------------------------------------------------------------------------------


def _make_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Malicious:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_make_marker, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    torch.save({"cls_token": Malicious(marker)}, ckpt)
    assert not marker.exists()
    with pytest.raises(InputError, match="arbitrary Python objects.*trust_checkpoint=True"):
        load_backbone(TINY, str(ckpt))
    assert not marker.exists()


def test_training_checkpoint_needs_trust(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    src = tiny(seed=5)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"teacher": _wrap(dino_named_state_dict(src), "teacher")["teacher"],
                "args": argparse.Namespace(arch="vit_small")}, ckpt)
    with pytest.raises(InputError, match=r"argparse.Namespace"):
        load_backbone(TINY, str(ckpt))
    model, info = load_backbone(TINY, str(ckpt), trust_checkpoint=True)
    x = images(224, 224)
    torch.testing.assert_close(dino_features(model, x), dino_features(src, x), rtol=0, atol=0)
    assert info.weights_tag == "file:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]


def test_unreadable_checkpoint(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_backbone(TINY, str(bad), trust_checkpoint=True)


def test_random_weights_deterministic_and_rng_neutral(tiny_spec: BackboneSpec) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, info = load_backbone(TINY, "random", seed=7)
    b, _ = load_backbone(TINY, "random", seed=7)
    c, _ = load_backbone(TINY, "random", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.pos_embed, c.pos_embed)
    assert info.weights_tag == "random-seed7" and info.pos_interp == "dino"
    assert (info.name, info.embed_dim, info.patch) == (TINY, D, P)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_official_dino_file(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    with pytest.raises(ConfigError, match=r"tiny_dino_pretrain\.pth.*https://dl\.fbaipublicfiles\.com/dino/"):
        load_backbone(TINY, "dino", weights_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs weights_dir"):
        load_backbone(TINY, "dino")
    src = tiny(seed=3)
    f = tmp_path / "tiny_dino_pretrain.pth"
    torch.save(dino_named_state_dict(src), f)
    model, info = load_backbone(TINY, "dino", weights_dir=tmp_path, pos_interp="timm")
    assert info.weights_tag == "dino:" + hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    assert info.pos_interp == "timm"
    x = images(320, 320)
    torch.testing.assert_close(dino_features(model, x), dino_features(src, x, pos_interp="timm"), rtol=0, atol=0)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"allowed values: \[.*'vit_base_patch8_224\.dino'"):
        load_backbone("vit_huge_patch8")
    with pytest.raises(ConfigError, match="pos_interp"):
        load_backbone("vit_small_patch16_224.dino", pos_interp="nearest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="neither 'random', 'dino', 'timm' nor an existing"):
        load_backbone("vit_small_patch16_224.dino", str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="no official DINO-v1 file"):
        load_backbone("vit_small_patch14_dinov2.lvd142m", "dino", weights_dir=tmp_path)


def test_timm_weights_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(backbones.timm, "create_model", offline)
    with pytest.raises(InputError, match="network access or a populated timm"):
        load_backbone("vit_small_patch16_224.dino", "timm")


def test_dinov2_uses_timm_handling() -> None:
    model, info = load_backbone("vit_small_patch14_dinov2.lvd142m", "random", seed=0)
    assert info.pos_interp == "timm" and info.patch == 14
    x = images(224, 168)
    with torch.inference_mode():
        feats = dino_features(model, x)
        ref = model.forward_features(x)[:, model.num_prefix_tokens :]
    assert feats.shape == (1, 384, 16, 12)
    torch.testing.assert_close(feats, ref.reshape(1, 16, 12, 384).permute(0, 3, 1, 2), rtol=0, atol=0)
