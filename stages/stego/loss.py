"""STEGO's contrastive correlation loss (method.md §3), as pure tensor functions.

Nothing here does I/O or keeps state. Random draws (sample coordinates, negative partners) come from
``generator`` (default: torch's global RNG) in the reference order, so ``torch.manual_seed(s)`` right
before :func:`correlation_loss` reproduces the reference's draws; each draw can also be injected.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, InputError

from stages.stego.settings import PARTS, LossOptions  # noqa: E402  (re-exported)
"""The three partner kinds: the image itself, its kNN partner, other images of the batch."""

_NORM_EPS = 1e-10


def _norm(t: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the channel dim 1 (``t / max(||t||, 1e-10)``)."""
    return F.normalize(t, dim=1, eps=_NORM_EPS)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a:[N,C,H,W]``, ``b:[N,C,I,J]`` -> ``[N,H,W,I,J]`` with ``out[n,h,w,i,j] = sum_c a[n,c,h,w] b[n,c,i,j]``."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``t:[B,C,H,W]`` at ``coords:[B,S,S,2]`` (x=width, y=height, in [-1, 1]).

    Border padding, ``align_corners=True`` (-1/+1 are the centres of the first/last cells). As in the
    reference the two sample axes are swapped: ``out[b,:,i,j]`` is the value at ``coords[b,j,i]``.
    Returns ``[B,C,S,S]``.
    """
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), mode="bilinear", padding_mode="border", align_corners=True)


def super_perm(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The reference's negative-partner shuffle: ``randperm(n)``, +1 at fixed points, ``mod n``.

    No fixed point for ``n >= 2``, but duplicates are possible (not a permutation); ``n == 1`` gives ``[0]``.
    Consumes exactly one ``randperm(n)`` draw.
    """
    perm = torch.randperm(n, generator=generator, device=device)
    perm = perm + (perm == torch.arange(n, device=perm.device)).to(perm.dtype)
    return perm % n


def true_derangement(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` without fixed points (rejection sampling, ``n >= 2``)."""
    if n < 2:
        raise InputError(f"a derangement of the batch needs at least 2 images, got a batch of {n}")
    identity = torch.arange(n, device=device)
    while True:
        perm = torch.randperm(n, generator=generator, device=device)
        if not bool((perm == identity).any()):
            return perm


def correlation_term(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    shift: float,
    *,
    pointwise: bool,
    zero_clamp: bool,
    stabilize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor/partner term (method.md §3.2) on sampled features ``f*:[B,D,S,S]`` and codes ``c*:[B,d,S,S]``.

    Returns ``(loss, cd)``, both elementwise ``[B,S,S,S,S]``: ``cd`` is the code cosine correlation (with
    grad) and ``loss = -clamp(cd, min, max) * (fd - shift)`` with ``fd`` the feature cosine correlation
    (no grad), centred per anchor point over the partner points when ``pointwise`` (the global mean of
    ``fd`` is added back). ``min`` is 0 with ``zero_clamp`` else -9999; ``max`` is 0.8 with ``stabilize``.
    """
    with torch.no_grad():
        fd = tensor_correlation(_norm(f1), _norm(f2))
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = tensor_correlation(_norm(c1), _norm(c2))
    min_val = 0.0 if zero_clamp else -9999.0
    clamped = cd.clamp(min_val, 0.8) if stabilize else cd.clamp(min_val)
    return -clamped * (fd - shift), cd


def _check_maps(feats: torch.Tensor, feats_pos: torch.Tensor, code: torch.Tensor, code_pos: torch.Tensor) -> None:
    named = {"feats": feats, "feats_pos": feats_pos, "code": code, "code_pos": code_pos}
    for name, t in named.items():
        if t.ndim != 4 or not t.is_floating_point():
            raise InputError(f"{name} must be a floating [B,C,h,w] tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if feats.shape != feats_pos.shape:
        raise InputError(f"feats {tuple(feats.shape)} and feats_pos {tuple(feats_pos.shape)} must have the same shape")
    if code.shape != code_pos.shape:
        raise InputError(f"code {tuple(code.shape)} and code_pos {tuple(code_pos.shape)} must have the same shape")
    if code.shape[0] != feats.shape[0]:
        raise InputError(f"code batch {code.shape[0]} differs from feats batch {feats.shape[0]}")


def _check_coords(name: str, coords: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(coords.shape) != shape:
        raise InputError(f"{name} must have shape {list(shape)} ([B,S,S,2]), got {list(coords.shape)}")


def _check_parts(name: str, mapping: Mapping[str, float]) -> None:
    missing = [k for k in PARTS if k not in mapping]
    if missing:
        raise ConfigError(f"{name} is missing key(s) {missing}; required keys are {list(PARTS)}")


def correlation_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    options: LossOptions,
    *,
    coords1: torch.Tensor | None = None,
    coords2: torch.Tensor | None = None,
    perms: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The contrastive correlation loss of method.md §3.3 for anchor maps and their kNN partners.

    ``feats``/``feats_pos``: ``[B,D,h,w]`` (dropout) features of the anchors and partners, ``code``/
    ``code_pos``: ``[B,d,h,w]`` head outputs; ``options`` the :class:`LossOptions` (a ``TrainSettings``
    is one). ``S = options.feature_samples`` points per side are drawn as ``coords1 = rand*2-1``
    (anchors), ``coords2 = rand*2-1`` (partners), then one shuffle of the batch per negative
    (:func:`super_perm`, or :func:`true_derangement` if ``options.true_permutation``); any of them may
    be injected instead (``perms``: ``neg_samples`` index tensors of length B). Negatives are other
    images of the anchor batch sampled at ``coords2``.

    Returns scalar means ``intra``, ``inter``, ``neg`` (losses) and ``cd_intra``, ``cd_inter``,
    ``cd_neg`` (code correlations, for monitoring).
    """
    _check_maps(feats, feats_pos, code, code_pos)
    feature_samples, neg_samples, shifts = options.feature_samples, options.neg_samples, options.shifts
    batch = feats.shape[0]
    device = feats.device
    coord_shape = (batch, feature_samples, feature_samples, 2)
    if coords1 is None:
        coords1 = torch.rand(coord_shape, generator=generator, device=device) * 2 - 1
    _check_coords("coords1", coords1, coord_shape)
    if coords2 is None:
        coords2 = torch.rand(coord_shape, generator=generator, device=device) * 2 - 1
    _check_coords("coords2", coords2, coord_shape)
    coords1 = coords1.to(device=device, dtype=feats.dtype)
    coords2 = coords2.to(device=device, dtype=feats.dtype)
    if perms is None:
        shuffle = true_derangement if options.true_permutation else super_perm
        perms = [shuffle(batch, generator=generator, device=device) for _ in range(neg_samples)]
    if len(perms) != neg_samples:
        raise InputError(f"perms holds {len(perms)} index tensors, expected neg_samples={neg_samples}")
    for k, perm in enumerate(perms):
        if tuple(perm.shape) != (batch,) or perm.is_floating_point() or bool(((perm < 0) | (perm >= batch)).any()):
            raise InputError(f"perms[{k}] must be {batch} integer batch indices in [0, {batch}), got {perm.tolist()}")

    opts = {"pointwise": options.pointwise, "zero_clamp": options.zero_clamp, "stabilize": options.stabilize}
    f_anchor, c_anchor = sample(feats, coords1), sample(code, coords1)
    f_pos, c_pos = sample(feats_pos, coords2), sample(code_pos, coords2)
    intra_loss, intra_cd = correlation_term(f_anchor, f_anchor, c_anchor, c_anchor, shifts["intra"], **opts)
    inter_loss, inter_cd = correlation_term(f_anchor, f_pos, c_anchor, c_pos, shifts["inter"], **opts)
    neg_losses, neg_cds = [], []
    for perm in perms:
        perm = perm.to(device=device, dtype=torch.long)
        f_neg, c_neg = sample(feats[perm], coords2), sample(code[perm], coords2)
        loss, cd = correlation_term(f_anchor, f_neg, c_anchor, c_neg, shifts["neg"], **opts)
        neg_losses.append(loss)
        neg_cds.append(cd)
    return {
        "intra": intra_loss.mean(),
        "inter": inter_loss.mean(),
        "neg": torch.cat(neg_losses).mean(),
        "cd_intra": intra_cd.mean(),
        "cd_inter": inter_cd.mean(),
        "cd_neg": torch.cat(neg_cds).mean(),
    }


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``weights.intra*losses.intra + weights.inter*losses.inter + weights.neg*losses.neg`` (method.md §3.4)."""
    _check_parts("weights", weights)
    _check_parts("losses", losses)
    return weights["inter"] * losses["inter"] + weights["intra"] * losses["intra"] + weights["neg"] * losses["neg"]
