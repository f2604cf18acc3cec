"""Probes on a (frozen) code: the cosine cluster probe, the 1×1 linear probe, their training, and
the prediction helpers used by evaluation (docs/method.md, "Probes").

Pure torch modules and math first (no I/O); then the probe files (:func:`save_probes`,
:func:`load_probes`), shared by the ``probe`` and ``train-head`` stages.

Shapes: ``code`` is ``[B, dim, h, w]`` float; ``labels`` is ``[B, H, W]`` integer with ignored
pixels outside ``[0, n_classes)`` (e.g. -1).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from torch import nn

from pipeline.artifacts import write_json_atomic
from pipeline.errors import ArtifactError, ConfigError, InputError

__all__ = [
    "PROBE_LR", "CLUSTER_CRF_ALPHA", "ClusterProbe", "LinearProbe", "ProbeTrainer",
    "upsample_code", "predict_batch",
    "PROBES_FORMAT", "Probes", "save_probes", "load_probes",
]

from stages.evaluation.settings import PROBE_LR  # noqa: E402  (re-exported)
CLUSTER_CRF_ALPHA = 2.0  # temperature of the cluster-probe CRF unary, hard-coded in the reference (§7)


def _check_code(x: torch.Tensor, dim: int, name: str = "code") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name}: expected a tensor [B, {dim}, h, w], got {shape}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def upsample_code(code: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``code [B, C, h, w]`` to ``size = (H, W)`` (``align_corners=False``)."""
    if tuple(code.shape[-2:]) == tuple(size):
        return code
    return F.interpolate(code, size=tuple(size), mode="bilinear", align_corners=False)


class ClusterProbe(nn.Module):
    """Cosine k-means probe: ``n_clusters`` centroids ``clusters [n_clusters, dim]`` (randn init)."""

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        if dim < 1 or n_clusters < 1:
            raise ConfigError(f"ClusterProbe: dim={dim} and n_clusters={n_clusters} must be >= 1")
        self.dim = dim
        self.n_clusters = n_clusters
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def reset_parameters(self) -> None:
        """Re-draw the centroids from N(0, 1) (global torch RNG)."""
        with torch.no_grad():
            self.clusters.normal_()

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel to every centroid: ``[B, dim, H, W]`` → ``[B, n, H, W]``."""
        _check_code(x, self.dim)
        c = F.normalize(self.clusters, dim=1)
        return torch.einsum("bchw,nc->bnhw", F.normalize(x, dim=1), c)

    def forward(self, x: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, probs)``: ``probs`` is the one-hot argmax (``alpha=None``) or
        ``softmax(alpha·cos)``; ``loss = −mean_{b,h,w} Σ_n probs·cos`` (hard k-means when
        ``alpha=None``: the gradient reaches only each pixel's winning centroid)."""
        inner = self.inner(x)
        if alpha is None:
            probs = F.one_hot(inner.argmax(1), self.n_clusters).permute(0, 3, 1, 2).to(inner.dtype)
        else:
            probs = F.softmax(alpha * inner, dim=1)
        loss = -(probs * inner).sum(1).mean()
        return loss, probs

    def log_probs(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """``log_softmax(alpha·cos)`` over clusters, ``[B, n, H, W]``."""
        return F.log_softmax(alpha * self.inner(x), dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster id of every pixel (argmax cosine), int64 ``[B, H, W]``."""
        return self.inner(x).argmax(1)


class LinearProbe(nn.Module):
    """1×1 convolution ``dim → n_classes`` with bias; parameters are ``conv.weight [n, dim, 1, 1]``
    and ``conv.bias [n]`` (also reachable as ``probe.weight`` / ``probe.bias``)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        if dim < 1 or n_classes < 1:
            raise ConfigError(f"LinearProbe: dim={dim} and n_classes={n_classes} must be >= 1")
        self.dim = dim
        self.n_classes = n_classes
        self.conv = nn.Conv2d(dim, n_classes, kernel_size=1, bias=True)
        self.updates: int | None = None  # optimiser steps taken when trained here (0: no labelled pixel seen)

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    @property
    def bias(self) -> nn.Parameter:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n_classes, h, w]`` at the resolution of ``x``."""
        _check_code(x, self.dim)
        return self.conv(x)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits bilinearly upsampled (``align_corners=False``) to the label
        size, averaged over pixels with ``0 <= label < n_classes``. As in the reference, the result
        is NaN when the batch has no valid pixel (callers decide whether to skip such a step)."""
        if labels.ndim != 3 or labels.shape[0] != x.shape[0] or labels.is_floating_point():
            raise InputError(f"labels: expected an integer tensor [{x.shape[0]}, H, W], got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        logits = upsample_code(self(x), tuple(labels.shape[-2:]))
        flat = logits.permute(0, 2, 3, 1).reshape(-1, self.n_classes)
        target = labels.reshape(-1).to(logits.device).long()
        valid = (target >= 0) & (target < self.n_classes)
        return F.cross_entropy(flat[valid], target[valid])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class id of every pixel (argmax of the logits), int64 ``[B, h, w]``."""
        return self(x).argmax(1)

    def load_stego(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a STEGO ``linear_probe`` (``weight [n, dim]`` or ``[n, dim, 1, 1]``, ``bias [n]``)."""
        w = torch.as_tensor(weight)
        b = torch.as_tensor(bias)
        n, d = self.n_classes, self.dim
        if w.shape not in ((n, d), (n, d, 1, 1)) or tuple(b.shape) != (n,):
            raise InputError(f"linear_probe: expected weight [{n}, {d}] or [{n}, {d}, 1, 1] and bias "
                             f"[{n}], got {tuple(w.shape)} and {tuple(b.shape)}")
        with torch.no_grad():
            self.conv.weight.copy_(w.reshape(n, d, 1, 1))
            self.conv.bias.copy_(b)


ClusterFit = Literal["adam", "kmeans"]


class ProbeTrainer:
    """Train a linear and a cluster probe on batches of ``(code [B, dim, h, w], labels [B, H, W])``.

    * linear probe: Adam(``lr``) on :meth:`LinearProbe.loss` (logits upsampled to the labels);
      a batch without valid label pixels gives a NaN loss and no update;
    * cluster probe, ``cluster_fit="adam"`` (reference): Adam(``lr``) on the hard cluster loss
      ``ClusterProbe(code, alpha=None)`` at the code's own (feature) resolution, labels unused;
    * ``cluster_fit="kmeans"``: mini-batch spherical k-means (k-means++ init on the first batch,
      per-centroid step size 1/count) on the unit-normalised code vectors, in torch on the code's
      device (a GPU when the code is there; cuML's k-means is neither spherical nor mini-batch).

    Both probes are built under ``seed`` without disturbing the global RNG: the centroids equal
    ``torch.manual_seed(seed); torch.randn(n_clusters, dim)``. Training is deterministic on CPU.
    """

    def __init__(self, dim: int, n_classes: int, *, n_clusters: int | None = None,
                 lr: float = PROBE_LR, seed: int = 0, cluster_fit: ClusterFit = "adam",
                 device: str | torch.device = "cpu") -> None:
        if cluster_fit not in ("adam", "kmeans"):
            raise ConfigError(f"cluster_fit={cluster_fit!r}: allowed values are 'adam', 'kmeans'")
        if not lr > 0:
            raise ConfigError(f"lr={lr}: must be > 0")
        self.device = torch.device(device)
        self.cluster_fit = cluster_fit
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cluster = ClusterProbe(dim, n_clusters or n_classes).to(self.device)
            self.linear = LinearProbe(dim, n_classes).to(self.device)
        self.linear.updates = 0
        self.linear_opt = torch.optim.Adam(self.linear.parameters(), lr=lr)
        self.cluster_opt = (torch.optim.Adam(self.cluster.parameters(), lr=lr)
                            if cluster_fit == "adam" else None)
        self._counts = torch.zeros(self.cluster.n_clusters, device=self.device, dtype=torch.float64)
        self._kmeans_ready = False
        self.steps = 0

    def step(self, code: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One update of both probes; returns ``{"linear": loss, "cluster": loss}`` (before update)."""
        code = code.detach().to(self.device, torch.float32)
        _check_code(code, self.linear.dim)
        labels = labels.to(self.device)
        linear_loss = self.linear.loss(code, labels)
        if torch.isfinite(linear_loss):  # not finite: no labelled pixel in the batch
            self.linear_opt.zero_grad(set_to_none=True)
            linear_loss.backward()
            self.linear_opt.step()
            self.linear.updates = (self.linear.updates or 0) + 1
        if self.cluster_opt is not None:
            cluster_loss, _ = self.cluster(code, None)
            self.cluster_opt.zero_grad(set_to_none=True)
            cluster_loss.backward()
            self.cluster_opt.step()
        else:
            cluster_loss = self._kmeans_step(code)
        self.steps += 1
        return {"linear": float(linear_loss.detach()), "cluster": float(cluster_loss.detach())}

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
            max_steps: int | None = None) -> list[dict[str, float]]:
        """Run :meth:`step` over ``batches`` (at most ``max_steps``); returns the loss history."""
        history = []
        for code, labels in batches:
            if max_steps is not None and len(history) >= max_steps:
                break
            history.append(self.step(code, labels))
        return history

    @torch.no_grad()
    def _kmeans_step(self, code: torch.Tensor) -> torch.Tensor:
        x = F.normalize(code.permute(0, 2, 3, 1).reshape(-1, code.shape[1]), dim=1)
        k = self.cluster.n_clusters
        if not self._kmeans_ready:
            if x.shape[0] < k:
                raise InputError(f"code: the first batch has {x.shape[0]} vectors, fewer than the "
                                 f"{k} clusters that k-means++ must initialise from it")
            self.cluster.clusters.copy_(self._kmeans_pp(x, k))
            self._kmeans_ready = True
        centroids = self.cluster.clusters
        sims = x @ F.normalize(centroids, dim=1).T
        best, assign = sims.max(1)
        n = torch.bincount(assign, minlength=k).to(torch.float64)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        self._counts += n
        hit = n > 0
        step = (sums[hit] - n[hit, None].to(x.dtype) * centroids[hit]) / self._counts[hit, None].to(x.dtype)
        centroids[hit] += step
        return -best.mean()

    def _kmeans_pp(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """k-means++ seeding with cosine distance ``1 − cos``, seeded by ``self.seed``."""
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        first = int(torch.randint(x.shape[0], (1,), generator=g))
        chosen = [first]
        dist = (1 - x @ x[first]).clamp_min(0)
        for _ in range(1, k):
            weights = dist.double().cpu()
            if weights.sum() <= 0:  # fewer distinct directions than clusters
                weights = torch.ones_like(weights)
            idx = int(torch.multinomial(weights, 1, generator=g))
            chosen.append(idx)
            dist = torch.minimum(dist, (1 - x @ x[idx]).clamp_min(0))
        return x[chosen].clone()


@torch.no_grad()
def predict_batch(code_upsampled: torch.Tensor, linear: LinearProbe, cluster: ClusterProbe, *,
                  unaries: bool = False) -> dict[str, torch.Tensor]:
    """Evaluation predictions on a code already upsampled to the label size ``[B, dim, H, W]``.

    Returns ``linear`` and ``cluster`` int64 ``[B, H, W]`` (argmax of the logits / of the cosine
    similarities); with ``unaries=True`` also the CRF inputs ``linear_unary = log_softmax(logits)``
    and ``cluster_unary = log_softmax(2·cos)`` (``[B, C, H, W]``, method.md §7).
    """
    logits = linear(code_upsampled)
    inner = cluster.inner(code_upsampled)
    out = {"linear": logits.argmax(1), "cluster": inner.argmax(1)}
    if unaries:
        out["linear_unary"] = F.log_softmax(logits, dim=1)
        out["cluster_unary"] = F.log_softmax(CLUSTER_CRF_ALPHA * inner, dim=1)
    return out


# --------------------------------------------------------------------------------------------------
# probe files (shared with train-head) and the ``probe`` stage
# --------------------------------------------------------------------------------------------------
#
# Probe files: a folder holding
#   probes.safetensors  float32 tensors ``linear.weight [n_classes, dim]``, ``linear.bias [n_classes]``,
#                       ``cluster.clusters [n_clusters, dim]`` (un-normalised centroids);
#   probes.json         ``{"format": 1, "n_classes", "n_clusters", "dim", "class_names",
#                       "projection": {"kind", "in_dim", "dim"}, ...}`` (extra keys are free).
# The probe artifact holds them at its root; a train-head artifact in ``<artifact>/probes/``.

PROBES_FORMAT = 1
PROBES_TENSORS = "probes.safetensors"
PROBES_META = "probes.json"


@dataclass
class Probes:
    """A loaded pair of probes and the metadata of their ``probes.json``."""

    linear: LinearProbe
    cluster: ClusterProbe
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.linear.dim

    @property
    def linear_trained(self) -> bool:
        """False when the linear probe never took a step (trained without any labelled pixel); probes
        saved without that record (imported, older) count as trained."""
        return self.meta.get("linear_updates") != 0

    @property
    def n_classes(self) -> int:
        return self.linear.n_classes

    @property
    def n_clusters(self) -> int:
        return self.cluster.n_clusters


def save_probes(directory: Path, linear: LinearProbe, cluster: ClusterProbe, *, class_names: Sequence[str],
                projection: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``probes.safetensors`` + ``probes.json`` (format above) into ``directory``.

    ``projection`` is the projection the probes read codes from (its ``kind``, ``in_dim``, ``dim``
    are recorded); ``extra`` adds JSON fields (training settings, losses, ...).
    """
    if linear.dim != cluster.dim or linear.dim != projection.dim:
        raise InputError(f"probes: linear probe dim {linear.dim}, cluster probe dim {cluster.dim} and "
                         f"projection dim {projection.dim} must agree")
    if len(class_names) != linear.n_classes:
        raise InputError(f"probes: {len(class_names)} class names for a linear probe of {linear.n_classes} classes")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "linear.weight": linear.weight.detach().reshape(linear.n_classes, linear.dim).cpu().float().numpy(),
        "linear.bias": linear.bias.detach().cpu().float().numpy(),
        "cluster.clusters": cluster.clusters.detach().cpu().float().numpy(),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / PROBES_TENSORS))
    meta = {**dict(extra or {}), "format": PROBES_FORMAT, "n_classes": linear.n_classes,
            "n_clusters": cluster.n_clusters, "dim": linear.dim, "class_names": [str(c) for c in class_names],
            "linear_updates": linear.updates,
            "projection": {"kind": projection.kind, "in_dim": int(projection.in_dim), "dim": int(projection.dim)}}
    write_json_atomic(directory / PROBES_META, meta)


def load_probes(directory: Path) -> Probes:
    """Load probes saved by :func:`save_probes` (a probe artifact folder, or ``<head artifact>/probes``)."""
    directory = Path(directory)
    meta_path, tensors_path = directory / PROBES_META, directory / PROBES_TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ArtifactError(f"{directory}: holds no probes ({PROBES_META} and {PROBES_TENSORS} expected)")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensors_path))
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{directory}: unreadable probe files ({exc})") from exc
    if meta.get("format") != PROBES_FORMAT:
        raise ArtifactError(f"{meta_path}: format {meta.get('format')!r}, this code reads {PROBES_FORMAT}")
    try:
        n, k, d = int(meta["n_classes"]), int(meta["n_clusters"]), int(meta["dim"])
        weight, bias, clusters = tensors["linear.weight"], tensors["linear.bias"], tensors["cluster.clusters"]
    except KeyError as exc:
        raise ArtifactError(f"{directory}: probe files lack {exc}") from exc
    if weight.shape != (n, d) or bias.shape != (n,) or clusters.shape != (k, d):
        raise ArtifactError(f"{tensors_path}: tensor shapes {weight.shape}, {bias.shape}, {clusters.shape} do "
                            f"not match n_classes={n}, n_clusters={k}, dim={d} of {meta_path}")
    linear, cluster = LinearProbe(d, n), ClusterProbe(d, k)
    linear.load_stego(torch.from_numpy(weight), torch.from_numpy(bias))
    with torch.no_grad():
        cluster.clusters.copy_(torch.from_numpy(clusters))
    return Probes(linear.eval(), cluster.eval(), meta)
