"""Typed readers of the artifact kinds one stage (or command) reads from another: one class per kind,
the one place that knows the kind's file names (its writer uses the same class attributes). Light: no
torch, zarr or numpy, so planning and registration may import it. Tokens artifacts:
:class:`stages.store.TokensArtifact`."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactView
from pipeline.errors import ArtifactError

PROJECTION_DIR = "projection"
"""The folder of a saved projection (``load_projection``) in every projection provider (reduce, train-head)."""


class KnnArtifact(ArtifactView):
    """A ``knn`` artifact: the neighbour table of its ``tokens`` input."""

    NNS = "nns.npz"

    @property
    def nns_path(self) -> Path:
        return self.path / self.NNS


class ReduceArtifact(ArtifactView):
    """A ``reduce`` artifact (a fitted projection of its ``tokens`` input): the projection, the fit
    record and, for PCA, the explained-variance curve."""

    PROJECTION = PROJECTION_DIR
    FIT = "fit.json"
    EVR = "evr.json"

    @property
    def evr(self) -> dict[str, Any] | None:
        """The explained-variance curve, None when the fit wrote none."""
        return self.read_json(self.EVR) if (self.path / self.EVR).is_file() else None


class HeadArtifact(ArtifactView):
    """A ``train-head`` artifact (trained or imported): the head's weights and shape, the head as a
    projection, its probes; trained heads list their ``tokens`` (and ``val``) inputs."""

    WEIGHTS = "head.safetensors"
    META = "head.json"
    PROJECTION = PROJECTION_DIR
    PROBES = "probes"

    @property
    def probes_dir(self) -> Path:
        return self.path / self.PROBES


class ProbesArtifact(ArtifactView):
    """A ``probe`` artifact: probes (``save_probes``'s files) trained on the codes of its ``projection``
    input (none: raw tokens)."""

    @property
    def probes_dir(self) -> Path:
        return self.path

    @property
    def projection_id(self) -> str | None:
        return self.lineage.get("projection")


class EvalArtifact(ArtifactView):
    """An ``evaluate`` artifact: ``metrics.json`` = ``{"protocol": {...}, "scores": {...}}``."""

    METRICS = "metrics.json"

    @cached_property
    def metrics(self) -> dict[str, Any]:
        metrics = self.read_json(self.METRICS)
        if not isinstance(metrics, dict) or not isinstance(metrics.get("protocol"), dict) \
                or not isinstance(metrics.get("scores"), dict):
            raise ArtifactError(f"{self.path / self.METRICS}: expected an object with 'protocol' and 'scores'")
        return metrics

    @property
    def protocol(self) -> dict[str, Any]:
        return self.metrics["protocol"]

    @property
    def scores(self) -> dict[str, Any]:
        return self.metrics["scores"]
