"""A trained (or imported) STEGO head as a :class:`~stages.projections.Projection` of kind ``"stego"``,
and the files of a ``head`` artifact.

``transform_map`` is the eval-mode code ``cluster1(f) + cluster2(f)`` (no dropout) of a feature map;
``transform`` applies the same 1×1 convolutions to single tokens. Saved as ``projection.json``
(``params``: dim, projection type, dropout) plus ``projection.safetensors`` holding the head's
state dict under its own parameter names (``cluster1.0.weight``, ...), so the arrays load 1:1 into
:class:`~stages.stego.head.StegoHead`.

A head artifact (stage ``train-head``, trained or imported) holds ``head.safetensors`` (the same state
dict), ``head.json``, ``projection/`` (this projection) and ``probes/`` (the linear and cluster probes
trained with the head, in the probe stage's format); see :func:`write_head_files`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from pipeline.artifacts import write_json_atomic
from pipeline.errors import ArtifactError, InputError
from stages.artifacts import HeadArtifact
from stages.evaluation.probes import ClusterProbe, LinearProbe, save_probes
from stages.projections import BaseProjection, register_projection
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
