"""A trained (or imported) STEGO head as a :class:`~stages.projections.Projection` of kind ``"stego"``,
and the files of a ``head`` artifact.

``transform_map`` is the eval-mode code ``cluster1(f) + cluster2(f)`` (no dropout) of a feature map;
``transform`` applies the same 1×1 convolutions to single tokens. Saved as ``projection.json``
(``params``: dim, projection type, dropout) plus ``projection.safetensors`` holding the head's
state dict under its own parameter names (``cluster1.0.weight``, ...), so the arrays load 1:1 into
:class:`~stages.stego.head.StegoHead`.

A head artifact (stage ``train-head``, trained or imported) holds ``head.safetensors`` (the same state
dict), ``head.json``, ``projection/`` (this projection) and ``probes/`` (the linear and cluster probes
trained with the head, in the probe stage's format); see :func:`write_head_files`. A released STEGO
checkpoint becomes the same files through :func:`write_imported` (``stegopipe import-stego`` or
``head.checkpoint``), plus its stored config (``stego_cfg.json``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from pipeline.artifacts import write_json_atomic
from pipeline.errors import ArtifactError, InputError
from stages.artifacts import HeadArtifact
from stages.datasets.labelmaps import CITYSCAPES27_CLASS_NAMES, COCO27_CLASS_NAMES, POTSDAM3_CLASS_NAMES
from stages.evaluation.probes import ClusterProbe, LinearProbe, save_probes
from stages.projections import BaseProjection, register_projection
from stages.stego.checkpoint import checkpoint_sha256, read_stego_checkpoint
from stages.stego.head import StegoHead


@register_projection("stego")
class StegoProjection(BaseProjection):
    """Wraps a :class:`StegoHead`; ``in_dim`` = token width D, ``dim`` = code width."""

    def __init__(self, head: StegoHead) -> None:
        self.head = head.eval()
        self.in_dim = int(head.in_dim)

    @property
    def dim(self) -> int:
        return int(self.head.dim)

    def _on(self, device: torch.device) -> StegoHead:
        if next(self.head.parameters()).device != device:
            self.head = self.head.to(device)
        return self.head

    @torch.no_grad()
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        head = self._on(x.device)
        return head.code(x.to(torch.float32)[:, :, None, None])[:, :, 0, 0]

    @torch.no_grad()
    def transform_map(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim, h, w]`` -> eval-mode code ``[B, dim, h, w]`` float32 (on the input's device)."""
        if feats.ndim != 4 or feats.shape[1] != self.in_dim:
            raise InputError(f"feature map must be [B, {self.in_dim}, h, w], got shape {tuple(feats.shape)}")
        if not bool(torch.isfinite(feats).all()):
            raise InputError("feature map contains NaN or inf values")
        head = self._on(feats.device)
        return head.code(feats.to(torch.float32)).float()

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {"dim": self.dim, "projection": self.head.projection, "dropout": self.head.dropout}
        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.head.state_dict().items()}
        return params, arrays

    @classmethod
    def _from_state(cls, in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> StegoProjection:
        head = StegoHead(in_dim, int(params["dim"]), str(params["projection"]), float(params["dropout"]))
        expected = set(head.state_dict())
        if set(arrays) != expected:
            raise ArtifactError(f"saved stego projection holds tensors {sorted(arrays)}, expected {sorted(expected)}")
        try:
            head.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)
        except RuntimeError as err:
            raise ArtifactError(f"saved stego projection does not fit a {params['projection']} head "
                                f"{in_dim}->{params['dim']}: {err}") from err
        return cls(head)


# --------------------------------------------------------------------------------------------------
# files of a head artifact (written by train-head, whether trained or imported)
# --------------------------------------------------------------------------------------------------

FILES_FORMAT = 1


def write_head_files(out: Path, head: StegoHead, linear: LinearProbe, cluster: ClusterProbe, *,
                     class_names: Sequence[str], info: Mapping[str, Any]) -> None:
    """Write a head artifact's common files into ``out``: ``head.safetensors`` (the head's state dict),
    ``head.json`` (``info`` plus the head's shape), ``projection/`` (kind ``stego``) and ``probes/``
    (:func:`stages.evaluation.probes.save_probes`, the probe stage's format)."""
    out = Path(out)
    if linear.dim != head.dim:
        raise InputError(f"probes read codes of width {linear.dim}, but the head outputs {head.dim}")
    save_file({k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in head.state_dict().items()},
              str(out / HeadArtifact.WEIGHTS))
    meta = {**dict(info), "format": FILES_FORMAT, "in_dim": head.in_dim, "dim": head.dim,
            "projection": head.projection, "dropout": head.dropout, "n_classes": linear.n_classes,
            "n_clusters": cluster.n_clusters}
    write_json_atomic(out / HeadArtifact.META, meta)
    projection = StegoProjection(head)
    projection.save(out / HeadArtifact.PROJECTION)
    save_probes(out / HeadArtifact.PROBES, linear, cluster, class_names=class_names, projection=projection,
                extra={"source": info.get("source")})


STEGO_CFG_FILE = "stego_cfg.json"
KNOWN_CLASS_NAMES = {"cocostuff27": COCO27_CLASS_NAMES, "cityscapes": CITYSCAPES27_CLASS_NAMES,
                     "potsdam": POTSDAM3_CLASS_NAMES}
"""Class names by the checkpoint's ``cfg.dataset_name`` (others get ``class_<i>``)."""


def write_imported(path: Path, out: Path, *, expected_sha256: str | None = None,
                   ignore_unknown: bool = False) -> dict[str, Any]:
    """Convert the STEGO checkpoint ``path`` into head-artifact files in ``out``; returns manifest fields.

    ``InputError`` (naming the file) when the file changed since ``expected_sha256`` was computed, has
    state-dict keys the converter does not know (listed; ``ignore_unknown`` imports anyway and records
    them), or holds no head (a DINO-baseline checkpoint). Missing keys are reported by the reader.
    """
    path = Path(path).expanduser().resolve()
    sha = checkpoint_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise InputError(f"{path}: the file changed since the run was planned (sha256 {sha[:16]}…, "
                         f"planned {expected_sha256[:16]}…); run again")
    ckpt = read_stego_checkpoint(path)
    if ckpt.unknown_keys and not ignore_unknown:
        keys = ", ".join(map(repr, ckpt.unknown_keys))  # repr: a key from the file may hold any character
        raise InputError(f"{path}: unknown state-dict key(s) {keys}; this is not the "
                         f"STEGO layout the importer knows (use --ignore-unknown-keys / "
                         f"head.checkpoint_ignore_unknown=true to import the known parts anyway)")
    if ckpt.head_state is None or ckpt.projection is None:
        raise InputError(f"{path}: holds no STEGO head (no net.cluster* keys): it is a DINO-baseline checkpoint; "
                         f"use projection.method=identity for DINO features")
    head = StegoHead(ckpt.feature_dim, ckpt.dim, ckpt.projection)  # STEGO's Dropout2d p is hard-coded 0.1
    head.load_state_dict(ckpt.head_state, strict=True)
    linear = LinearProbe(ckpt.dim, ckpt.n_classes)
    linear.load_stego(ckpt.linear_probe["weight"], ckpt.linear_probe["bias"])
    cluster = ClusterProbe(ckpt.dim, ckpt.n_classes + ckpt.extra_clusters)
    with torch.no_grad():
        cluster.clusters.copy_(ckpt.cluster_centroids)
    info = {"source": "imported", "checkpoint_sha256": sha, "backbone": ckpt.backbone, "patch": ckpt.patch_size,
            "dataset": ckpt.dataset_name, "global_step": ckpt.global_step}
    names = KNOWN_CLASS_NAMES.get(str(ckpt.dataset_name), [])
    class_names = names if len(names) == ckpt.n_classes else [f"class_{i}" for i in range(ckpt.n_classes)]
    write_head_files(out, head, linear, cluster, class_names=class_names, info=info)
    (Path(out) / STEGO_CFG_FILE).write_text(json.dumps(ckpt.cfg, indent=2, sort_keys=True, default=str) + "\n")
    return {"imported_from": str(path), "checkpoint_sha256": sha, "stego_cfg": json.loads(json.dumps(ckpt.cfg, default=str)),
            "backbone": {"model_type": ckpt.backbone, "patch": ckpt.patch_size},
            "checkpoint": {"epoch": ckpt.epoch, "global_step": ckpt.global_step,
                           "lightning_version": ckpt.lightning_version},
            "counts": {"n_classes": ckpt.n_classes, "extra_clusters": ckpt.extra_clusters, "dim": ckpt.dim,
                       "feature_dim": ckpt.feature_dim},
            "ignored_unknown_keys": list(ckpt.unknown_keys)}
