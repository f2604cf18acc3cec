"""The STEGO segmentation head (method.md §2) with the featurizer's channel dropout (method.md §1.4).

Parameter names match the ``net.`` part of a STEGO checkpoint (``cluster1.0.weight``,
``cluster2.0.weight``, ``cluster2.2.weight``, ...), so a released head loads 1:1.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError, InputError

from stages.stego.settings import PROJECTIONS  # noqa: E402  (re-exported)


def channel_dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``Dropout2d(p)`` in training mode: zero whole channels of ``x:[B,C,h,w]`` with probability ``p``.

    Survivors are scaled by ``1/(1-p)``. Draws one ``[B,C,1,1]`` Bernoulli mask exactly as
    ``torch.nn.functional.dropout2d`` does, so the global RNG gives the same masks as the reference.
    """
    if p == 0.0:
        return x
    if p == 1.0:
        return x * torch.zeros_like(x)
    mask = x.new_empty((x.shape[0], x.shape[1], 1, 1)).bernoulli_(1.0 - p, generator=generator)
    return x * mask.div_(1.0 - p)


class StegoHead(nn.Module):
    """``code = cluster1(drop(f)) + cluster2(drop(f))`` on feature maps ``f:[B,in_dim,h,w]``.

    ``cluster1`` = Conv1x1(in_dim→dim); ``cluster2`` = Conv1x1(in_dim→in_dim)→ReLU→Conv1x1(in_dim→dim),
    present only for ``projection="nonlinear"``. PyTorch default init, biases everywhere.
    """

    def __init__(self, in_dim: int, dim: int, projection: str = "nonlinear", dropout: float = 0.1) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ConfigError(f"projection={projection!r} is not supported; allowed values: {list(PROJECTIONS)}")
        if in_dim < 1 or dim < 1:
            raise ConfigError(f"in_dim and dim must be >= 1, got in_dim={in_dim}, dim={dim}")
        if not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"dropout={dropout} must be a probability in [0, 1]")
        self.in_dim = in_dim
        self.dim = dim
        self.projection = projection
        self.dropout = float(dropout)
        self.cluster1 = nn.Sequential(nn.Conv2d(in_dim, dim, kernel_size=1))
        self.cluster2 = (
            nn.Sequential(nn.Conv2d(in_dim, in_dim, kernel_size=1), nn.ReLU(), nn.Conv2d(in_dim, dim, kernel_size=1))
            if projection == "nonlinear"
            else None
        )

    def forward(
        self, feats: torch.Tensor, *, train_dropout: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(feats_for_loss, code)`` for ``feats:[B,in_dim,h,w]``; code is ``[B,dim,h,w]``.

        With ``train_dropout`` independent channel-dropout masks are drawn in the reference order:
        cluster1 input, cluster2 input (nonlinear only), returned feats. Otherwise dropout is the
        identity and the returned feats are ``feats`` itself.
        """
        if feats.ndim != 4 or feats.shape[1] != self.in_dim:
            raise InputError(f"head input must be [B,{self.in_dim},h,w], got shape {list(feats.shape)}")

        def drop(x: torch.Tensor) -> torch.Tensor:
            return channel_dropout(x, self.dropout, generator) if train_dropout else x

        code = self.cluster1(drop(feats))
        if self.cluster2 is not None:
            code = code + self.cluster2(drop(feats))
        return drop(feats), code

    def code(self, feats: torch.Tensor) -> torch.Tensor:
        """Eval-mode code (no dropout) of ``feats:[B,in_dim,h,w]`` -> ``[B,dim,h,w]``."""
        return self.forward(feats)[1]
