"""Frozen DINO ViT backbones (timm models) and official DINO checkpoint loading.

Spec: method.md §1.1 (variants, weights, hyper-parameters), §1.2 (which tensor is ``feat``),
§1.3 (DINO's "+0.1" position-embedding interpolation), worked example RV11.

``feat`` is the output of the last block after the final LayerNorm, CLS token dropped, reshaped
row-major to ``[B, D, H/p, W/p]``. At grids other than the native 224/p one, the learned position
embedding is resampled the way DINO does it (``pos_interp="dino"``, default) or with timm's own
size-based resampling (``pos_interp="timm"``); the two differ slightly (§1.3).
"""
from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal


from pipeline.artifacts import sha256_file_cached
from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

timm = lazy_module("timm")
torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
vit = lazy_module("timm.models.vision_transformer")

PosInterp = Literal["dino", "timm"]
POS_INTERP_MODES: tuple[str, ...] = ("dino", "timm")
DINO_URL_BASE = "https://dl.fbaipublicfiles.com/dino/"
_POS_INTERP_ATTR = "stegopipe_pos_interp"
_SHA_PREFIX = 16


@dataclass(frozen=True)
class BackboneSpec:
    """One supported backbone: timm name, architecture, and (DINO v1 only) the official file."""

    name: str
    family: Literal["dino", "dinov2"]
    embed_dim: int
    depth: int
    num_heads: int
    patch: int
    dino_file: str | None = None

    @property
    def dino_url(self) -> str | None:
        """Download address of the official DINO teacher checkpoint (None for DINOv2)."""
        if self.dino_file is None:
            return None
        return f"{DINO_URL_BASE}{self.dino_file.removesuffix('.pth')}/{self.dino_file}"


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("vit_small_patch8_224.dino", "dino", 384, 12, 6, 8, "dino_deitsmall8_300ep_pretrain.pth"),
        BackboneSpec("vit_small_patch16_224.dino", "dino", 384, 12, 6, 16, "dino_deitsmall16_pretrain.pth"),
        BackboneSpec("vit_base_patch8_224.dino", "dino", 768, 12, 12, 8, "dino_vitbase8_pretrain.pth"),
        BackboneSpec("vit_base_patch16_224.dino", "dino", 768, 12, 12, 16, "dino_vitbase16_pretrain.pth"),
        BackboneSpec("vit_small_patch14_dinov2.lvd142m", "dinov2", 384, 12, 6, 14),
        BackboneSpec("vit_base_patch14_dinov2.lvd142m", "dinov2", 768, 12, 12, 14),
        # Scale rehearsals only (benchmarks/scale.py): ViT-S/8's patch and position embedding and final
        # LayerNorm, no blocks, random weights: real 28×28×384 tokens at 224 px, a fraction of the forward.
        BackboneSpec("vit_small_patch8_embed.rehearsal", "dino", 384, 0, 6, 8),
    )
}


@dataclass(frozen=True)
class BackboneInfo:
    """What was loaded: enough to name the features it produces (goes into artifact params)."""

    name: str
    embed_dim: int
    patch: int
    weights_tag: str
    pos_interp: str


def build_vit(embed_dim: int, depth: int, num_heads: int, patch_size: int) -> VisionTransformer:
    """A timm ViT with DINO's hyper-parameters (§1.1), randomly initialised from the global RNG.

    img_size 224, mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6, GELU, no dropout / drop-path, CLS token,
    learned absolute pos-embed ``[1, 1 + (224/p)^2, D]``, no classifier (``num_classes=0``), final
    LayerNorm on the tokens (``global_pool="token"`` keeps ``fc_norm`` an identity), and
    ``dynamic_img_size`` so inputs of any patch-divisible size are accepted.
    """
    return vit.VisionTransformer(
        img_size=224,
        patch_size=patch_size,
        in_chans=3,
        num_classes=0,
        global_pool="token",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        no_embed_class=False,
        fc_norm=False,
        dynamic_img_size=True,
        drop_rate=0.0,
        pos_drop_rate=0.0,
        proj_drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        act_layer=torch.nn.GELU,
    )


def _unwrap_dino(state_dict: Mapping[str, object], source: str) -> dict[str, object]:
    """Pick the ViT weights out of an official file or a DINO training checkpoint.

    A training checkpoint's ``teacher`` entry is used; ``module.`` prefixes are stripped; if keys
    carry a ``backbone.`` prefix (DINO's MultiCropWrapper), only those are kept (the rest is DINO's
    projection head, not part of the featurizer) and the prefix is stripped.
    """
    if not isinstance(state_dict, Mapping):
        raise InputError(f"{source}: expected a dict of tensors, got {type(state_dict).__name__}")
    sd: Mapping[str, object] = state_dict
    if "teacher" in sd:
        sd = sd["teacher"]  # type: ignore[assignment]
        if not isinstance(sd, Mapping):
            raise InputError(f"{source}: 'teacher' entry is a {type(sd).__name__}, expected a dict of tensors")
    out = {(k.removeprefix("module.") if isinstance(k, str) else k): v for k, v in sd.items()}
    if any(isinstance(k, str) and k.startswith("backbone.") for k in out):
        out = {k.removeprefix("backbone."): v for k, v in out.items() if k.startswith("backbone.")}
    return out


def _strict_load(model: torch.nn.Module, state_dict: Mapping[str, object], source: str) -> None:
    """``load_state_dict(strict=True)`` with one InputError listing missing/unexpected/bad keys."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(str(k) for k in state_dict if k not in expected)
    if missing or unexpected:
        raise InputError(
            f"{source}: state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, ref in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{source}: key '{key}' holds a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            raise InputError(
                f"{source}: key '{key}' has shape {list(value.shape)}, the model expects {list(ref.shape)} "
                "(wrong variant or patch size?)"
            )
    model.load_state_dict(dict(state_dict), strict=True)  # type: ignore[arg-type]


def load_dino_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, object], *, source: str = "state_dict"
) -> None:
    """Load official DINO ViT weights into a timm ViT from :func:`build_vit`, strictly.

    Official names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.i.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``) coincide with timm's; accepted
    wrappers: a ``teacher`` entry, ``module.`` and ``backbone.`` prefixes. Missing or unexpected
    keys, non-tensors and shape mismatches raise :class:`InputError` naming them and ``source``.
    """
    _strict_load(model, _unwrap_dino(state_dict, source), source)


def _dino_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` (§1.3) for a ``[1, 1 + gh*gw, D]`` pos-embed.

    Unchanged at the native grid; otherwise the patch part is reshaped to ``[1, D, gh, gw]``,
    resampled bicubically with ``scale_factor=((h + 0.1)/gh, (w + 0.1)/gw)`` (align_corners=False,
    no antialias), flattened row-major and the CLS entry re-prepended.
    """
    gh, gw = grid
    if (h, w) == (gh, gw):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic", align_corners=False
    )
    if tuple(patch_pos.shape[-2:]) != (h, w):
        raise InputError(
            f"images: DINO pos-embed interpolation gave a {tuple(patch_pos.shape[-2:])} grid for a {(h, w)} "
            "token grid; use pos_interp='timm' for this size"
        )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def dino_features(
    model: VisionTransformer, images: torch.Tensor, *, pos_interp: PosInterp | None = None
) -> torch.Tensor:
    """Frozen-backbone ``feat`` (§1.2): ``[B, 3, H, W]`` images → ``[B, D, H/p, W/p]`` float32.

    Last block → final LayerNorm → drop prefix (CLS) tokens → row-major grid. H and W must be
    multiples of the patch size. ``pos_interp`` defaults to the mode :func:`load_backbone` recorded
    on the model, else ``"dino"``. Works under ``torch.inference_mode`` and autocast.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images: expected a [B, 3, H, W] tensor, got shape {list(images.shape)}")
    mode = pos_interp if pos_interp is not None else getattr(model, _POS_INTERP_ATTR, "dino")
    if mode not in POS_INTERP_MODES:
        raise ConfigError(f"pos_interp={mode!r} is not supported; allowed values: {list(POS_INTERP_MODES)}")
    ph, pw = model.patch_embed.patch_size
    bsz, _, height, width = images.shape
    if height % ph or width % pw:
        raise InputError(
            f"images: size {height}x{width} is not divisible by the patch size {ph}x{pw}; "
            "resize or crop to a multiple of the patch"
        )
    h, w = height // ph, width // pw
    if not model.dynamic_img_size and (h, w) != tuple(model.patch_embed.grid_size):
        raise ConfigError(
            "model: built without dynamic_img_size=True, so only its native input size works; "
            "use build_vit or load_backbone"
        )
    if mode == "timm":
        tokens = model.forward_features(images)
    else:
        if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
            raise ConfigError(
                "pos_interp='dino' needs a DINO-v1 layout (one CLS token sharing the pos-embed); "
                "use pos_interp='timm' for this model"
            )
        x = model.patch_embed(images).reshape(bsz, h * w, -1)
        x = torch.cat([model.cls_token.expand(bsz, -1, -1), x], dim=1)
        x = x + _dino_pos_embed(model.pos_embed, tuple(model.patch_embed.grid_size), h, w)
        x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
        tokens = model.norm(model.blocks(x))
    grid = tokens[:, model.num_prefix_tokens :].reshape(bsz, h, w, -1)
    return grid.permute(0, 3, 1, 2).float().contiguous()


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:_SHA_PREFIX]


def _torch_load(path: Path, trust_checkpoint: bool) -> object:
    """``torch.load`` with ``weights_only=True``; arbitrary objects only when explicitly trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs_global = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if needs_global is None:
            raise InputError(f"{path}: not a readable torch checkpoint (unpickling failed)") from exc
        if not trust_checkpoint:
            raise InputError(
                f"{path}: the checkpoint needs arbitrary Python objects ({needs_global.group(1)}) to unpickle, "
                "which can run code; refused. If you trust the file, pass trust_checkpoint=True"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure of a trusted full unpickle is reported as bad input
        raise InputError(f"{path}: could not load the trusted checkpoint ({type(exc).__name__}: {exc})") from exc


def _construct(spec: BackboneSpec, seed: int) -> VisionTransformer:
    """Build the architecture with a seeded init that leaves the global CPU RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.family == "dino":
            return build_vit(spec.embed_dim, spec.depth, spec.num_heads, spec.patch)
        return timm.create_model(spec.name, pretrained=False, num_classes=0, dynamic_img_size=True)


def load_backbone(
    name: str,
    weights: str = "random",
    *,
    weights_dir: str | Path | None = None,
    seed: int = 0,
    trust_checkpoint: bool = False,
    pos_interp: PosInterp = "dino",
) -> tuple[VisionTransformer, BackboneInfo]:
    """A frozen (eval mode, ``requires_grad=False``) backbone and a :class:`BackboneInfo`.

    ``weights``: ``"random"`` (seeded init, deterministic per ``seed``, global RNG untouched),
    ``"dino"`` (the official file of §1.1 found in ``weights_dir``), ``"timm"`` (timm's pretrained
    weights; needs network or a populated cache) or a checkpoint path (``torch.load`` with
    ``weights_only=True``; arbitrary pickles only with ``trust_checkpoint=True``). DINOv2 backbones
    always use timm's own pos-embed resampling (``info.pos_interp == "timm"``).
    """
    if name not in BACKBONES:
        raise ConfigError(f"backbone name={name!r} is unknown; allowed values: {sorted(BACKBONES)}")
    if pos_interp not in POS_INTERP_MODES:
        raise ConfigError(f"pos_interp={pos_interp!r} is not supported; allowed values: {list(POS_INTERP_MODES)}")
    spec = BACKBONES[name]
    mode = pos_interp if spec.family == "dino" else "timm"

    if weights == "timm":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
        except Exception as exc:  # noqa: BLE001 - timm/hf-hub raise many types when offline
            raise InputError(
                f"timm pretrained weights for {name!r} could not be loaded ({type(exc).__name__}: {exc}); "
                "this needs network access or a populated timm / Hugging Face cache "
                "(or use weights='dino' with weights_dir, or a checkpoint path)"
            ) from exc
        tag = "timm"
    else:
        model = _construct(spec, seed)
        if weights == "random":
            tag = f"random-seed{seed}"
        elif weights == "dino":
            path = _official_dino_path(spec, weights_dir)
            load_dino_state_dict(model, _torch_load(path, trust_checkpoint), source=str(path))
            tag = f"dino:{_sha256_prefix(path)}"
        else:
            path = Path(weights)
            if not path.is_file():
                raise ConfigError(
                    f"weights={weights!r} is neither 'random', 'dino', 'timm' nor an existing checkpoint file"
                )
            loaded = _torch_load(path, trust_checkpoint)
            if spec.family == "dino":
                load_dino_state_dict(model, loaded, source=str(path))
            else:
                if not isinstance(loaded, Mapping):
                    raise InputError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
                _strict_load(model, vit.checkpoint_filter_fn(dict(loaded), model), str(path))
            tag = f"file:{_sha256_prefix(path)}"

    model.eval()
    model.requires_grad_(False)
    setattr(model, _POS_INTERP_ATTR, mode)
    return model, BackboneInfo(name=name, embed_dim=spec.embed_dim, patch=spec.patch, weights_tag=tag, pos_interp=mode)


def _official_dino_path(spec: BackboneSpec, weights_dir: str | Path | None) -> Path:
    if spec.dino_file is None:
        raise ConfigError(
            f"weights='dino' is not available for {spec.name!r} (DINOv2 has no official DINO-v1 file); "
            "allowed for it: 'random', 'timm' or a checkpoint path"
        )
    if weights_dir is None:
        raise ConfigError(
            f"weights='dino' needs weights_dir: a directory holding {spec.dino_file} (download: {spec.dino_url})"
        )
    path = Path(weights_dir) / spec.dino_file
    if not path.is_file():
        raise ConfigError(
            f"weights_dir={str(weights_dir)!r} has no {spec.dino_file}; download it from {spec.dino_url}"
        )
    return path


__all__ = [
    "BACKBONES",
    "BackboneInfo",
    "BackboneSpec",
    "build_vit",
    "dino_features",
    "load_backbone",
    "load_dino_state_dict",
    "weights_tag",
]


def _weights_file_tag(prefix: str, path: Path, key: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{key}: weights file {path} does not exist")
    return f"{prefix}:{sha256_file_cached(path)[:16]}"


def weights_tag(backbone: Any) -> str:
    """The tag :func:`load_backbone` will report for ``backbone.*``, computed without loading it.

    ``random-seed<k>``, ``timm``, ``dino:<sha16>`` or ``file:<sha16>`` of the weights file's content, so
    the artifact id follows the weights, not their path. File hashes are cached while the file is unchanged.
    """
    name, weights = backbone.name, backbone.weights
    if weights == "random":
        return f"random-seed{int(backbone.seed)}"
    if weights == "timm":
        return "timm"
    if weights == "dino":
        spec = BACKBONES[name]
        if spec.dino_file is None:
            raise ConfigError(f"backbone.weights=dino is not available for backbone.name={name} (no official "
                              "DINO-v1 file); allowed: random, timm or a checkpoint path")
        if not backbone.weights_dir:
            raise ConfigError(f"backbone.weights=dino needs backbone.weights_dir: a folder holding "
                              f"{spec.dino_file} (download: {spec.dino_url}); set WEIGHTS_DIR=DIR for make, "
                              f"or the environment variable STEGOPIPE_WEIGHTS_DIR")
        path = Path(backbone.weights_dir).expanduser() / spec.dino_file
        if not path.is_file():
            raise ConfigError(f"backbone.weights_dir={backbone.weights_dir}: no {spec.dino_file} there; "
                              f"download it from {spec.dino_url} (backbone.weights_dir comes from WEIGHTS_DIR=DIR "
                              f"for make, or STEGOPIPE_WEIGHTS_DIR)")
        return _weights_file_tag("dino", path, "backbone.weights_dir")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.weights={weights!r}: expected random, dino, timm or an existing checkpoint file")
    return _weights_file_tag("file", path, "backbone.weights")
