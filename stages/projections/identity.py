"""The identity projection: codes are the tokens (the "DINO baseline", a ``Projection`` kind)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.lazy import lazy_module
from stages.projections.base import BaseProjection, register_projection
from stages.projections.methods import Method, register_method

torch = lazy_module("torch")


@register_projection("identity")
class IdentityProjection(BaseProjection):
    """Codes are the tokens themselves (the DINO baseline)."""

    def __init__(self, in_dim: int) -> None:
        if in_dim < 1:
            raise ConfigError(f"in_dim must be >= 1, got {in_dim}")
        self.in_dim = int(in_dim)

    @property
    def dim(self) -> int:
        return self.in_dim

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # never alias the caller's tokens

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    @classmethod
    def _from_state(cls, in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> "IdentityProjection":
        return cls(in_dim)


register_method(Method("identity", "DINO", "black", stage=None, module=__name__, dim_required=False, legend=0))
