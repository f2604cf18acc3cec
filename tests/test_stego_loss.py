"""STEGO correlation loss: method.md §3, worked examples RV1-RV4."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from stages.stego.loss import (
    LossOptions,
    correlation_loss,
    correlation_term,
    sample,
    super_perm,
    true_derangement,
    weighted_total,
)

COCO_SHIFTS = {"intra": 0.12, "inter": 0.2, "neg": 1.0}
COCO_WEIGHTS = {"neg": 0.1538476246415498, "inter": 1.0, "intra": 0.1}


# ----------------------------------------------------------------------------------------- RV1
def test_rv1_sample_orientation_transposes_sample_axes():
    t = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)
    coords = torch.zeros(1, 2, 2, 2)
    coords[0, 0, 0] = torch.tensor([-1.0, -1.0])
    coords[0, 0, 1] = torch.tensor([1.0, -1.0])
    coords[0, 1, 0] = torch.tensor([0.0, 0.0])
    coords[0, 1, 1] = torch.tensor([1.0, 1.0])
    out = sample(t, coords)
    assert out.shape == (1, 1, 2, 2)
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 4.0], [2.0, 8.0]]))


@pytest.mark.parametrize(("xy", "expected"), [((0.5, -1.0), 1.5), ((2.0, 2.0), 8.0)])
def test_rv1_sample_bilinear_and_border(xy, expected):
    t = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)
    coords = torch.tensor(xy, dtype=torch.float32).reshape(1, 1, 1, 2)
    assert sample(t, coords).item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------- RV4
def test_rv4_super_perm_identity_draw(monkeypatch):
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n))
    assert super_perm(6).tolist() == [1, 2, 3, 4, 5, 0]


def test_rv4_super_perm_is_not_a_permutation(monkeypatch):
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.tensor([0, 2, 1, 3]))
    assert super_perm(4).tolist() == [1, 2, 1, 0]


def test_rv4_super_perm_size_one_is_the_image_itself():
    assert super_perm(1).tolist() == [0]


def test_rv4_super_perm_no_fixed_points_and_one_randperm_draw():
    for n in (2, 3, 8, 16):
        for seed in range(50):
            torch.manual_seed(seed)
            p = super_perm(n)
            assert not (p == torch.arange(n)).any()
            assert ((p >= 0) & (p < n)).all()
    torch.manual_seed(0)
    drawn = torch.randperm(8)
    after = torch.rand(1)
    torch.manual_seed(0)
    got = super_perm(8)
    expected = [(v + 1) % 8 if v == k else v for k, v in enumerate(drawn.tolist())]
    assert got.tolist() == expected
    assert torch.equal(torch.rand(1), after)  # consumed exactly one randperm(8)


def test_super_perm_generator_matches_global_seed():
    torch.manual_seed(0)
    a = super_perm(8)
    b = super_perm(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_true_derangement_is_a_fixed_point_free_permutation():
    g = torch.Generator().manual_seed(5)
    for n in (2, 3, 7):
        for _ in range(20):
            p = true_derangement(n, generator=g)
            assert sorted(p.tolist()) == list(range(n))
            assert not (p == torch.arange(n)).any()
    with pytest.raises(InputError, match="at least 2"):
        true_derangement(1)


# ----------------------------------------------------------------------------------------- RV2
def _rv2_inputs():
    torch.manual_seed(0)
    return [torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)]


def _ref_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine correlation [N,C,H,W] x [N,C,I,J] -> [N,H,W,I,J] by a plain loop over points (float64)."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-10)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-10)
    n, _, h, w = a.shape
    out = np.zeros((n, h, w) + b.shape[2:])
    for k, y, x in itertools.product(range(n), range(h), range(w)):
        out[k, y, x] = np.tensordot(a[k, :, y, x], b[k], axes=(0, 0))
    return out


def _ref_term(f1, f2, c1, c2, shift, pointwise, zero_clamp, stabilize):
    fd = _ref_corr(np.float64(f1), np.float64(f2))
    if pointwise:
        global_mean = fd.mean()
        fd = fd - fd.mean(axis=(3, 4), keepdims=True)
        fd = fd - fd.mean() + global_mean
    cd = _ref_corr(np.float64(c1), np.float64(c2))
    lo = 0.0 if zero_clamp else -9999.0
    hi = 0.8 if stabilize else np.inf
    return -np.clip(cd, lo, hi) * (fd - shift), cd


@pytest.mark.parametrize(("pointwise", "zero_clamp", "stabilize"), list(itertools.product([True, False], repeat=3)))
def test_rv2_correlation_term_matches_loop_reference(pointwise, zero_clamp, stabilize):
    f1, f2, c1, c2 = _rv2_inputs()
    loss, cd = correlation_term(f1, f2, c1, c2, 0.1, pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    assert loss.shape == cd.shape == (2, 5, 5, 5, 5)
    ref_loss, ref_cd = _ref_term(*(t.numpy() for t in (f1, f2, c1, c2)), 0.1, pointwise, zero_clamp, stabilize)
    np.testing.assert_allclose(cd.numpy(), ref_cd, atol=1e-6)
    np.testing.assert_allclose(loss.numpy(), ref_loss, atol=1e-6)
    assert loss.mean().item() == pytest.approx(ref_loss.mean(), abs=1e-7)


def test_rv2_clamp_behaviour():
    f1, f2, c1, c2 = _rv2_inputs()
    opts = {"pointwise": True}
    clamped, cd = correlation_term(f1, f2, c1, c2, 0.1, zero_clamp=True, stabilize=False, **opts)
    free, _ = correlation_term(f1, f2, c1, c2, 0.1, zero_clamp=False, stabilize=False, **opts)
    negative = cd < 0
    assert negative.any() and (~negative).any()
    assert torch.all(clamped[negative] == 0)
    assert torch.equal(clamped[~negative], free[~negative])
    assert not torch.all(free[negative] == 0)
    # stabilize caps the code correlation at 0.8: the diagonal of the intra term has cd = 1
    stab, cd_intra = correlation_term(f1, f1, c1, c1, 0.1, zero_clamp=True, stabilize=True, **opts)
    plain, _ = correlation_term(f1, f1, c1, c1, 0.1, zero_clamp=True, stabilize=False, **opts)
    diag = cd_intra > 0.8
    assert diag.any()
    torch.testing.assert_close(stab[diag], plain[diag] / cd_intra[diag] * 0.8)


def test_rv2_intra_diagonal_is_one():
    f1, _, c1, _ = _rv2_inputs()
    _, cd = correlation_term(f1, f1, c1, c1, 0.1, pointwise=True, zero_clamp=True, stabilize=False)
    idx = torch.arange(5)
    diag = cd[:, idx[:, None], idx[None, :], idx[:, None], idx[None, :]]  # cd[n,h,w,h,w]
    torch.testing.assert_close(diag, torch.ones(2, 5, 5))


def test_rv2_gradient_flows_only_through_codes():
    f1, f2, c1, c2 = (t.requires_grad_() for t in _rv2_inputs())
    loss, _ = correlation_term(f1, f2, c1, c2, 0.1, pointwise=True, zero_clamp=True, stabilize=False)
    loss.mean().backward()
    assert f1.grad is None and f2.grad is None
    assert c1.grad is not None and c1.grad.abs().sum() > 0
    assert c2.grad is not None and c2.grad.abs().sum() > 0
    # check one gradient element against a finite difference
    with torch.no_grad():
        eps = 1e-3
        plus, minus = c1.detach().clone(), c1.detach().clone()
        plus[1, 2, 3, 4] += eps
        minus[1, 2, 3, 4] -= eps
        lp = correlation_term(f1, f2, plus, c2, 0.1, pointwise=True, zero_clamp=True, stabilize=False)[0].mean()
        lm = correlation_term(f1, f2, minus, c2, 0.1, pointwise=True, zero_clamp=True, stabilize=False)[0].mean()
    assert c1.grad[1, 2, 3, 4].item() == pytest.approx(((lp - lm) / (2 * eps)).item(), abs=1e-4)


def test_rv2_pointwise_centering_keeps_global_mean_per_anchor():
    f1, f2, _, _ = _rv2_inputs()
    ones = torch.ones(2, 4, 5, 5)  # constant codes: cd == 1 everywhere, so loss = -(fd - shift)
    shift = 0.1
    loss_c, cd = correlation_term(f1, f2, ones, ones, shift, pointwise=True, zero_clamp=False, stabilize=False)
    loss_r, _ = correlation_term(f1, f2, ones, ones, shift, pointwise=False, zero_clamp=False, stabilize=False)
    torch.testing.assert_close(cd, torch.ones_like(cd))
    fd_centred, fd_raw = shift - loss_c, shift - loss_r
    global_mean = fd_raw.mean()
    assert fd_centred.mean().item() == pytest.approx(global_mean.item(), abs=1e-6)
    per_anchor = fd_centred.mean(dim=(3, 4))
    torch.testing.assert_close(per_anchor, torch.full_like(per_anchor, global_mean.item()), atol=1e-6, rtol=0)
    # centring only moves each anchor's row by a constant
    offset = fd_centred - fd_raw
    torch.testing.assert_close(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- RV3
def _rv3_inputs():
    torch.manual_seed(1)
    feats, feats_pos = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    code, code_pos = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    return feats, feats_pos, code, code_pos


RV3_OPTS = LossOptions(feature_samples=3, neg_samples=2, pointwise=True, zero_clamp=True, stabilize=False,
                       weights=COCO_WEIGHTS, shifts=COCO_SHIFTS, true_permutation=False)


def _bilinear(t: np.ndarray, x: float, y: float) -> np.ndarray:
    """Value of ``t:[C,H,W]`` at normalised (x, y), align_corners=True, border clamp."""
    _, h, w = t.shape
    px = min(max((x + 1) / 2 * (w - 1), 0.0), w - 1.0)
    py = min(max((y + 1) / 2 * (h - 1), 0.0), h - 1.0)
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    top = (1 - ax) * t[:, y0, x0] + ax * t[:, y0, x1]
    bottom = (1 - ax) * t[:, y1, x0] + ax * t[:, y1, x1]
    return (1 - ay) * top + ay * bottom


def _ref_sample(maps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """[B,C,H,W] at coords [B,S,S,2] -> [B,C,S,S], with out[b,:,i,j] at coords[b,j,i]."""
    b, c = maps.shape[:2]
    s = coords.shape[1]
    out = np.zeros((b, c, s, s))
    for k, i, j in itertools.product(range(b), range(s), range(s)):
        out[k, :, i, j] = _bilinear(maps[k], *coords[k, j, i])
    return out


def _ref_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, shifts, pointwise):
    f, fp, c, cp = (np.float64(t.numpy()) for t in (feats, feats_pos, code, code_pos))
    c1, c2 = np.float64(coords1.numpy()), np.float64(coords2.numpy())
    fa, ca = _ref_sample(f, c1), _ref_sample(c, c1)
    fpos, cpos = _ref_sample(fp, c2), _ref_sample(cp, c2)
    intra, cd_intra = _ref_term(fa, fa, ca, ca, shifts["intra"], pointwise, True, False)
    inter, cd_inter = _ref_term(fa, fpos, ca, cpos, shifts["inter"], pointwise, True, False)
    negs, cd_negs = [], []
    for perm in perms:
        fn, cn = _ref_sample(f[perm.numpy()], c2), _ref_sample(c[perm.numpy()], c2)
        loss, cd = _ref_term(fa, fn, ca, cn, shifts["neg"], pointwise, True, False)
        negs.append(loss)
        cd_negs.append(cd)
    return {
        "intra": intra.mean(), "inter": inter.mean(), "neg": np.concatenate(negs).mean(),
        "cd_intra": cd_intra.mean(), "cd_inter": cd_inter.mean(), "cd_neg": np.concatenate(cd_negs).mean(),
    }


def test_rv3_injected_draws_match_independent_recomputation():
    feats, feats_pos, code, code_pos = _rv3_inputs()
    g = torch.Generator().manual_seed(7)
    coords1 = torch.rand(4, 3, 3, 2, generator=g) * 2.4 - 1.2  # also exercises the border clamp
    coords2 = torch.rand(4, 3, 3, 2, generator=g) * 2 - 1
    perms = [torch.tensor([1, 2, 3, 0]), torch.tensor([2, 2, 0, 1])]
    out = correlation_loss(feats, feats_pos, code, code_pos, RV3_OPTS, coords1=coords1, coords2=coords2, perms=perms)
    ref = _ref_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, COCO_SHIFTS, pointwise=True)
    assert set(out) == set(ref)
    for key, value in ref.items():
        assert out[key].ndim == 0
        assert out[key].item() == pytest.approx(value, abs=1e-6), key


def test_rv3_rng_order_rand_rand_then_one_randperm_per_negative():
    feats, feats_pos, code, code_pos = _rv3_inputs()
    torch.manual_seed(2)
    drawn = correlation_loss(feats, feats_pos, code, code_pos, RV3_OPTS)
    torch.manual_seed(2)
    coords1 = torch.rand(4, 3, 3, 2) * 2 - 1
    coords2 = torch.rand(4, 3, 3, 2) * 2 - 1
    perms = [super_perm(4), super_perm(4)]
    draws = {"coords1": coords1, "coords2": coords2, "perms": perms}
    injected = correlation_loss(feats, feats_pos, code, code_pos, RV3_OPTS, **draws)
    ref = _ref_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, COCO_SHIFTS, pointwise=True)
    gen = torch.Generator().manual_seed(2)
    with_gen = correlation_loss(feats, feats_pos, code, code_pos, RV3_OPTS, generator=gen)
    for key in ref:
        assert torch.equal(drawn[key], injected[key]), key
        assert torch.equal(drawn[key], with_gen[key]), key
        assert drawn[key].item() == pytest.approx(ref[key], abs=1e-6), key
    total = weighted_total(drawn, COCO_WEIGHTS)
    expected = 1.0 * ref["inter"] + 0.1 * ref["intra"] + 0.1538476246415498 * ref["neg"]
    assert total.item() == pytest.approx(expected, abs=1e-6)


def test_true_permutation_negatives_are_real_derangements():
    feats, feats_pos, code, code_pos = _rv3_inputs()
    torch.manual_seed(2)
    got = correlation_loss(feats, feats_pos, code, code_pos, replace(RV3_OPTS, true_permutation=True))
    torch.manual_seed(2)
    coords1 = torch.rand(4, 3, 3, 2) * 2 - 1
    coords2 = torch.rand(4, 3, 3, 2) * 2 - 1
    perms = [true_derangement(4), true_derangement(4)]
    assert all(sorted(p.tolist()) == [0, 1, 2, 3] for p in perms)
    ref = _ref_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, COCO_SHIFTS, pointwise=True)
    assert got["neg"].item() == pytest.approx(ref["neg"], abs=1e-6)


def test_loss_gradient_reaches_codes_only():
    feats, feats_pos, code, code_pos = (t.requires_grad_() for t in _rv3_inputs())
    torch.manual_seed(2)
    out = correlation_loss(feats, feats_pos, code, code_pos, RV3_OPTS)
    weighted_total(out, COCO_WEIGHTS).backward()
    assert feats.grad is None and feats_pos.grad is None
    assert code.grad.abs().sum() > 0 and code_pos.grad.abs().sum() > 0


def test_bad_arguments_are_reported():
    feats, feats_pos, code, code_pos = _rv3_inputs()
    opts = RV3_OPTS
    with pytest.raises(ConfigError, match=r"head\.shifts=.*neg"):
        replace(opts, shifts={"intra": 0.1, "inter": 0.2})
    with pytest.raises(ConfigError, match=r"head\.feature_samples=0"):
        replace(opts, feature_samples=0)
    with pytest.raises(InputError, match="coords1"):
        correlation_loss(feats, feats_pos, code, code_pos, opts, coords1=torch.zeros(4, 2, 2, 2))
    with pytest.raises(InputError, match="perms"):
        correlation_loss(feats, feats_pos, code, code_pos, opts, perms=[torch.tensor([0, 1, 2, 4])] * 2)
    with pytest.raises(InputError, match="feats_pos"):
        correlation_loss(feats, feats_pos[:2], code, code_pos, opts)
    with pytest.raises(ConfigError, match="weights"):
        weighted_total({"intra": 1, "inter": 1, "neg": 1}, {"intra": 1.0})
