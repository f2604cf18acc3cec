"""Read a released STEGO PyTorch-Lightning checkpoint (method.md §11) without running code from the file.

The file is a ``torch.save`` pickle whose ``hyper_parameters.cfg`` is an omegaconf ``DictConfig``. It is
read with ``torch.load(weights_only=True)`` (torch's restricted unpickler) plus an explicit allow-list
of the omegaconf / builtin / collections types that format needs; any other global in the pickle (a
``__reduce__`` calling ``os.system``, say) stops the load with an :class:`InputError` before it is
called. A Lightning ``ModelCheckpoint`` class used as a ``callbacks`` key by older Lightning versions is
mapped to an inert placeholder class (never imported, never called by the loader).

Before use, the zip records' crc32 are checked (a damaged file is refused, not read as other numbers),
and every tensor must fit its storage and all storages the file: a few KB whose tensors claim GBs
through zero or overlapping strides are refused before anything copies them.
"""
from __future__ import annotations

import collections
import pickle
import struct
import typing
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from pipeline.artifacts import sha256_file_cached
from pipeline.errors import InputError
from stages.stego.head import StegoHead


def _inert_class(qualified: str) -> tuple[type, str]:
    """An empty stand-in class registered under ``qualified``: the real class is never imported."""
    name = qualified.rsplit(".", 1)[1]
    placeholder = type(name, (), {"__module__": "stages.stego.checkpoint.inert", "foreign_name": qualified})
    return placeholder, qualified


_SAFE_GLOBALS: list[Any] = [
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    StringNode,
    IntegerNode,
    FloatNode,
    BooleanNode,
    dict,
    list,
    int,
    float,
    str,
    bool,
    collections.defaultdict,
    (typing.Any, "typing.Any"),
    _inert_class("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]
"""Everything beyond torch's own tensor/storage/OrderedDict types that the loader lets the pickle name."""

VIT_PREFIX = "net.model."
HEAD_PREFIX = "net."
_PROBE_KEYS = ("cluster_probe.clusters", "linear_probe.weight", "linear_probe.bias")
_IGNORED_KEYS = ("train_cluster_probe.clusters", "decoder.weight", "decoder.bias")
_VIT_WIDTHS = {"vit_small": 384, "vit_base": 768}


@dataclass(frozen=True)
class StegoCheckpoint:
    """What a STEGO (or stego-studies DINO-baseline) checkpoint holds, in plain tensors and dicts.

    ``dim`` is the width of the code the probes read: the head output, or ``feature_dim`` for a DINO
    baseline (``head_state``/``projection`` are None then). ``head_state`` loads into
    ``StegoHead(feature_dim, dim, projection)``; ``linear_probe`` = ``{"weight": [n, dim], "bias": [n]}``;
    ``cluster_centroids`` = ``[n_classes + extra_clusters, dim]``; ``backbone_state`` holds the ViT
    tensors (``net.model.`` prefix removed) for a comparison with the DINO weights. ``unknown_keys``
    lists state-dict keys the converter does not know (ignored otherwise).
    """

    path: Path
    n_classes: int
    extra_clusters: int
    dim: int
    feature_dim: int
    projection: str | None
    backbone: str
    patch_size: int
    dataset_name: str | None
    cfg: dict[str, Any]
    head_state: dict[str, torch.Tensor] | None = field(repr=False)
    linear_probe: dict[str, torch.Tensor] = field(repr=False)
    cluster_centroids: torch.Tensor = field(repr=False)
    backbone_state: dict[str, torch.Tensor] = field(repr=False)
    unknown_keys: tuple[str, ...] = ()
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | None = None


def _refusal_detail(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(kept or lines)[:500]


_DOS_DIR = 0x10
"""The MS-DOS "directory" bit of a zip entry's external attributes."""


def _check_zip(path: Path) -> None:
    """A zip checkpoint (torch >= 1.6) must pass the crc32 of every record: damage is refused, not loaded."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            folders = [info.filename for info in archive.infolist()
                       if info.filename.endswith("/") or info.external_attr & _DOS_DIR]
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            zlib.error, struct.error, IndexError, KeyError, OverflowError) as err:
        detail = " ".join(str(err).split())[:300]
        raise InputError(f"{path}: not a readable checkpoint archive ({type(err).__name__}: {detail})") from None
    if folders:  # torch's zip reader returns no bytes for such a record: its tensor would read as zeros
        raise InputError(f"{path}: record {folders[0]!r} is marked as a folder (the file is damaged)")
    if bad is not None:
        raise InputError(f"{path}: record {bad!r} fails its crc32 (the file is damaged)")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    _check_zip(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(
            f"{path}: refused to load: the pickle names something outside the allowed tensor / omegaconf / "
            f"builtin types ({_refusal_detail(err)}); only STEGO Lightning checkpoints are accepted"
        ) from None
    except Exception as err:  # torch raises many types for a file that is not a checkpoint at all
        detail = " ".join(str(err).split())[:500]
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {detail})") from None


def _check_tensors(path: Path, ckpt: Any) -> None:
    """InputError naming the first tensor that claims more elements than its storage holds (a zero or
    overlapping stride: copying it would materialise far more than the file), or when the storages
    together hold more bytes than the file (a claim no data backs)."""
    storages: dict[int, int] = {}
    todo: list[tuple[str, Any]] = [("", ckpt)]
    while todo:
        where, obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            needed = obj.numel() * obj.element_size()
            if needed > storage.nbytes():
                raise InputError(f"{path}: tensor {where or 'at top level'} claims shape {list(obj.shape)} "
                                 f"(stride {list(obj.stride())}, {needed} bytes) over a storage of "
                                 f"{storage.nbytes()} bytes: a crafted or damaged checkpoint")
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, (DictConfig, ListConfig)):
            continue  # holds no tensors; iterating it would resolve its interpolations
        elif isinstance(obj, Mapping):
            todo += [(f"{where}.{k}" if where else str(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    size = path.stat().st_size
    if sum(storages.values()) > size:
        raise InputError(f"{path}: its tensors claim {sum(storages.values())} bytes of storage but the file has "
                         f"{size}: a crafted or damaged checkpoint")


def _plain(obj: Any) -> Any:
    return OmegaConf.to_container(obj, resolve=False) if isinstance(obj, (DictConfig, ListConfig)) else obj


def _known(key: str) -> bool:
    return (
        key.startswith(VIT_PREFIX)
        or key.startswith("net.cluster")
        or key in _PROBE_KEYS
        or key in _IGNORED_KEYS
        or "_metrics." in key
    )


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1-conv weight ``[out,in,1,1]`` (or an already dense ``[out,in]``) as ``[out,in]``."""
    return weight[:, :, 0, 0] if weight.ndim == 4 and weight.shape[2:] == (1, 1) else weight


def read_stego_checkpoint(path: str | Path) -> StegoCheckpoint:
    """Read the STEGO checkpoint at ``path`` (layout of method.md §11) into a :class:`StegoCheckpoint`.

    Raises :class:`InputError` (naming the file) if the file cannot be read safely, lacks required
    keys (all of them listed), or its tensors disagree with each other or with its config.
    """
    path = Path(path)
    ckpt = _load(path)
    _check_tensors(path, ckpt)
    if not isinstance(ckpt, Mapping):
        raise InputError(f"{path}: expected a Lightning checkpoint dict at top level, got {type(ckpt).__name__}")

    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    state: Mapping[str, Any] = ckpt.get("state_dict", {})
    hparams = _plain(ckpt.get("hyper_parameters", {}))
    if not isinstance(state, Mapping) or not isinstance(hparams, Mapping):
        raise InputError(f"{path}: 'state_dict' and 'hyper_parameters' must be mappings")
    if "hyper_parameters" in ckpt and "cfg" not in hparams:
        missing.append("hyper_parameters.cfg")
    cfg = _plain(hparams.get("cfg", {}))
    if not isinstance(cfg, Mapping):
        raise InputError(f"{path}: hyper_parameters.cfg must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    missing += [f"state_dict.{k}" for k in _PROBE_KEYS if k not in state]

    head_keys = sorted(k for k in state if k.startswith("net.cluster"))
    projection = None
    if head_keys:
        projection = "nonlinear" if any(k.startswith("net.cluster2.") for k in head_keys) else "linear"
        if "net.cluster1.0.weight" not in state:
            missing.append("state_dict.net.cluster1.0.weight")
    if missing:
        raise InputError(f"{path}: not a STEGO checkpoint, missing required key(s): {', '.join(missing)}")
    not_tensors = [k for k in (*_PROBE_KEYS, *head_keys) if not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        raise InputError(f"{path}: state_dict entries {not_tensors} are not tensors")

    def fail(what: str) -> InputError:
        return InputError(f"{path}: inconsistent checkpoint: {what}")

    weight, bias = _dense(state["linear_probe.weight"]), state["linear_probe.bias"]
    centroids = state["cluster_probe.clusters"]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or centroids.ndim != 2:
        raise fail(
            f"linear_probe.weight {list(state['linear_probe.weight'].shape)}, linear_probe.bias "
            f"{list(bias.shape)}, cluster_probe.clusters {list(centroids.shape)} are not [n,dim(,1,1)], [n], [k,dim]"
        )
    n_classes, dim = weight.shape
    if hparams.get("n_classes", n_classes) != n_classes:
        raise fail(f"hyper_parameters.n_classes={hparams['n_classes']} but linear_probe has {n_classes} outputs")
    if centroids.shape[1] != dim:
        raise fail(f"cluster_probe.clusters width {centroids.shape[1]} differs from linear_probe width {dim}")
    extra_clusters = centroids.shape[0] - n_classes
    if extra_clusters < 0 or cfg.get("extra_clusters", extra_clusters) != extra_clusters:
        raise fail(
            f"cluster_probe.clusters has {centroids.shape[0]} rows for n_classes={n_classes} and "
            f"cfg.extra_clusters={cfg.get('extra_clusters')}"
        )

    head_state = None
    feature_dim = dim
    if projection is not None:
        cfg_projection = cfg.get("projection_type", projection)
        if cfg_projection != projection:
            raise fail(f"cfg.projection_type={cfg_projection!r} but the head weights are of a {projection} head")
        feature_dim = state["net.cluster1.0.weight"].shape[1]
        head_dim = state["net.cluster1.0.weight"].shape[0]
        if head_dim != dim:
            raise fail(f"head output width {head_dim} differs from probe width {dim}")
        with torch.device("meta"):
            expected = StegoHead(feature_dim, dim, projection).state_dict()
        head_state = {k[len(HEAD_PREFIX):]: state[k] for k in head_keys}
        if set(head_state) != set(expected):
            absent = sorted(set(expected) - set(head_state))
            extra = sorted(set(head_state) - set(expected))
            raise fail(f"head keys missing {absent}, unexpected {extra} for a {projection} head")
        for key, ref in expected.items():
            if head_state[key].shape != ref.shape:
                raise fail(f"net.{key} has shape {list(head_state[key].shape)}, expected {list(ref.shape)}")

    backbone_state = {k[len(VIT_PREFIX):]: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
    backbone, patch_size = _backbone(path, cfg, backbone_state, feature_dim)
    return StegoCheckpoint(
        path=path,
        n_classes=int(n_classes),
        extra_clusters=int(extra_clusters),
        dim=int(dim),
        feature_dim=int(feature_dim),
        projection=projection,
        backbone=backbone,
        patch_size=patch_size,
        dataset_name=cfg.get("dataset_name"),
        cfg=cfg,
        head_state=head_state,
        linear_probe={"weight": weight, "bias": bias},
        cluster_centroids=centroids,
        backbone_state=backbone_state,
        unknown_keys=tuple(sorted(k for k in state if not _known(k))),
        epoch=ckpt.get("epoch"),
        global_step=ckpt.get("global_step"),
        lightning_version=ckpt.get("pytorch-lightning_version"),
    )


def _backbone(path: Path, cfg: Mapping[str, Any], vit: Mapping[str, torch.Tensor], feature_dim: int) -> tuple[str, int]:
    """Backbone ``model_type`` and patch size: from the cfg, else inferred from the tensors (checked against them)."""
    width = vit["norm.weight"].shape[0] if "norm.weight" in vit else feature_dim
    if width != feature_dim:
        raise InputError(f"{path}: inconsistent checkpoint: ViT width {width} but the head/probes read {feature_dim}")
    by_width = {w: name for name, w in _VIT_WIDTHS.items()}
    model_type = cfg.get("model_type", by_width.get(width))
    if not isinstance(model_type, str):
        raise InputError(
            f"{path}: cannot tell the backbone: no cfg.model_type and feature width {width} is none of "
            f"{_VIT_WIDTHS}"
        )
    proj = vit.get("patch_embed.proj.weight")
    patch = proj.shape[-1] if proj is not None else None
    patch_size = cfg.get("dino_patch_size", patch)
    if patch_size is None:
        raise InputError(
            f"{path}: missing required key: hyper_parameters.cfg.dino_patch_size (no ViT weights to infer it from)"
        )
    if patch is not None and patch != patch_size:
        raise InputError(
            f"{path}: inconsistent checkpoint: cfg.dino_patch_size={patch_size} but patch_embed is {patch}x{patch}"
        )
    return model_type, int(patch_size)


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file (cached while the file is unchanged); ``InputError`` if it is missing."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file (head.checkpoint / import-stego)")
    return sha256_file_cached(path)
