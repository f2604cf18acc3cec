"""STEGO's settings and named choices, importable without torch (stage registration and planning read
them): the training settings of a head, the loss parts, the head kinds, model selections."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

PARTS = ("intra", "inter", "neg")
"""The three partner kinds of the correlation loss (method.md §3.3): the image itself, its kNN partner,
random other images."""
PROJECTIONS = ("nonlinear", "linear")
"""Head kinds (method.md §2)."""
SELECTIONS = ("last", "best_val_cluster_miou")
"""Which training step's head is kept (method.md §9.1)."""


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"head.{key}={value!r}: {allowed}")


@dataclass(frozen=True)
class LossOptions:
    """The options of STEGO's correlation loss (method.md §3): the one definition the loss, the trainer
    and the stage's params share (``head.*`` of the same names)."""

    feature_samples: int
    neg_samples: int
    pointwise: bool
    zero_clamp: bool
    stabilize: bool
    weights: Mapping[str, float]
    shifts: Mapping[str, float]
    true_permutation: bool

    def __post_init__(self) -> None:
        for key in ("feature_samples", "neg_samples"):
            value = getattr(self, key)
            _need(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
        for group in ("weights", "shifts"):
            mapping = getattr(self, group)
            _need(set(mapping) == set(PARTS), group, dict(mapping), f"needs exactly the keys {list(PARTS)}")
            _need(all(math.isfinite(v) for v in mapping.values()), group, dict(mapping), "values must be finite")


@dataclass(frozen=True)
class TrainSettings(LossOptions):
    """Everything that determines a trained head (the stage's params): the :class:`LossOptions` and the
    head, optimisation, validation and seed fields below."""

    projection: str
    dim: int
    dropout: float
    lr: float
    steps: int
    batch_size: int
    num_neighbors: int
    val_every: int
    selection: str
    extra_clusters: int
    amp: bool
    seed: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(self.projection in PROJECTIONS, "projection", self.projection, f"allowed values: {list(PROJECTIONS)}")
        _need(self.selection in SELECTIONS, "selection", self.selection, f"allowed values: {list(SELECTIONS)}")
        for key in ("dim", "steps", "batch_size", "num_neighbors"):
            value = getattr(self, key)
            _need(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
        for key in ("val_every", "extra_clusters"):
            value = getattr(self, key)
            _need(isinstance(value, int) and value >= 0, key, value, "must be an integer >= 0")
        _need(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be a probability in [0, 1)")
        _need(self.lr > 0, "lr", self.lr, "must be > 0")
        _need(self.selection == "last" or self.val_every > 0, "selection", self.selection,
              "best_val_cluster_miou needs validation (head.val_every > 0)")
        _need(not self.true_permutation or self.batch_size >= 2, "true_permutation", self.true_permutation,
              "a derangement of the batch needs head.batch_size >= 2")
