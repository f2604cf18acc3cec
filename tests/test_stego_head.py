"""STEGO head and feature dropout: method.md §1.4, §2, worked example RV12."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, InputError
from stages.stego.head import StegoHead, channel_dropout


def _rv12():
    torch.manual_seed(0)
    head = StegoHead(16, 4)
    feats = torch.randn(2, 16, 3, 3)
    return head, feats


def _manual_code(head: StegoHead, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """cluster1(x1) + cluster2(x2) written out with einsum on the raw parameters."""
    p = {k: v.detach() for k, v in head.state_dict().items()}

    def conv(w, b, x):
        return torch.einsum("oi,bihw->bohw", w[:, :, 0, 0], x) + b[None, :, None, None]

    hidden = torch.relu(conv(p["cluster2.0.weight"], p["cluster2.0.bias"], x2))
    linear = conv(p["cluster1.0.weight"], p["cluster1.0.bias"], x1)
    return linear + conv(p["cluster2.2.weight"], p["cluster2.2.bias"], hidden)


def test_parameter_names_and_shapes_match_stego_checkpoints():
    shapes = {k: tuple(v.shape) for k, v in StegoHead(16, 4).state_dict().items()}
    assert shapes == {
        "cluster1.0.weight": (4, 16, 1, 1),
        "cluster1.0.bias": (4,),
        "cluster2.0.weight": (16, 16, 1, 1),
        "cluster2.0.bias": (16,),
        "cluster2.2.weight": (4, 16, 1, 1),
        "cluster2.2.bias": (4,),
    }
    linear = StegoHead(16, 4, projection="linear").state_dict()
    assert set(linear) == {"cluster1.0.weight", "cluster1.0.bias"}


def test_rv12_eval_code_is_linear_plus_nonlinear_branch():
    head, feats = _rv12()
    rng_before = torch.get_rng_state()
    out_feats, code = head(feats)
    assert torch.equal(torch.get_rng_state(), rng_before)  # eval mode draws nothing
    assert out_feats is feats
    assert code.shape == (2, 4, 3, 3)
    torch.testing.assert_close(code, _manual_code(head, feats, feats))
    torch.testing.assert_close(head.code(feats), code)


def test_rv12_train_dropout_three_independent_masks_in_reference_order():
    head, feats = _rv12()
    # reference: F.dropout2d drawn for cluster1's input, then cluster2's, then the returned feats
    torch.manual_seed(3)
    expected = [F.dropout2d(feats, 0.1, training=True) for _ in range(3)]
    torch.manual_seed(3)
    out_feats, code = head(feats, train_dropout=True)
    torch.testing.assert_close(code, _manual_code(head, expected[0], expected[1]))
    assert torch.equal(out_feats, expected[2])

    dropped = [(x == 0).all(dim=(2, 3)) for x in expected]  # [B, D] per mask
    # recorded for seed 3 (torch CPU RNG): dropped channels per sample, for each of the three masks
    recorded = [[torch.nonzero(row).flatten().tolist() for row in d] for d in dropped]
    assert recorded == [[[14], [2]], [[7], []], [[3, 9, 10], [3, 4, 8]]]
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[1], dropped[2])
    assert not torch.equal(dropped[0], dropped[2])
    kept = ~dropped[2]
    torch.testing.assert_close(out_feats[kept], feats[kept] / 0.9)
    assert torch.all(out_feats[dropped[2]] == 0)


def test_channel_dropout_matches_torch_and_generator():
    x = torch.randn(4, 32, 2, 2)
    torch.manual_seed(11)
    ref = F.dropout2d(x, 0.3, training=True)
    torch.manual_seed(11)
    assert torch.equal(channel_dropout(x, 0.3), ref)
    assert torch.equal(channel_dropout(x, 0.3, torch.Generator().manual_seed(11)), ref)
    assert channel_dropout(x, 0.0) is x
    assert torch.equal(channel_dropout(x, 1.0), torch.zeros_like(x))


def test_generator_drives_the_masks():
    head, feats = _rv12()
    a = head(feats, train_dropout=True, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    b = head(feats, train_dropout=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_linear_head_draws_two_masks():
    torch.manual_seed(0)
    head = StegoHead(16, 4, projection="linear")
    feats = torch.randn(2, 16, 3, 3)
    torch.manual_seed(3)
    m1, m2 = F.dropout2d(feats, 0.1, True), F.dropout2d(feats, 0.1, True)
    torch.manual_seed(3)
    out_feats, code = head(feats, train_dropout=True)
    torch.testing.assert_close(code, head.cluster1(m1))
    assert torch.equal(out_feats, m2)


def test_gradients_reach_head_parameters():
    head, feats = _rv12()
    _, code = head(feats, train_dropout=True)
    code.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="projection"):
        StegoHead(16, 4, projection="mlp")
    with pytest.raises(ConfigError, match="dropout"):
        StegoHead(16, 4, dropout=1.5)
    with pytest.raises(InputError, match=r"\[B,16,h,w\]"):
        StegoHead(16, 4)(torch.zeros(2, 8, 3, 3))
