"""Dense CRF: reference constants, RV10 (edge-following refinement), pool runner vs serial, timeouts.

Kept free of a module-level torch import so that spawned pool workers, which import this module to
find the test loaders, start quickly; tests that need torch import it locally.
"""
from __future__ import annotations

import inspect
import os
import time

import numpy as np
import pytest

from pipeline.errors import ConfigError, InputError
from stages.crf import (
    BI_RGB_STD, BI_W, BI_XY_STD, MAX_ITER, POS_W, POS_XY_STD, crf_map, dense_crf, resize_bilinear,
)

H = W = 32


def _rv10_image() -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :16] = (230, 20, 20)
    img[:, 16:] = (20, 20, 230)
    return img


def _rv10_logits(strength: float = 2.0) -> np.ndarray:
    """Class 0 on the left, class 1 on the right, a wrong 4×4 patch on the left, a flat 2-px band
    (columns 15-16) on the colour edge."""
    lg = np.zeros((2, H, W), np.float32)
    lg[0, :, :15] = strength
    lg[1, :, 17:] = strength
    lg[:, 8:12, 4:8] = 0.0
    lg[1, 8:12, 4:8] = strength
    return lg


def _expected_map() -> np.ndarray:
    out = np.zeros((H, W), np.int64)
    out[:, 16:] = 1
    return out


def test_defaults_are_reference_constants():
    assert (MAX_ITER, POS_W, POS_XY_STD, BI_W, BI_XY_STD, BI_RGB_STD) == (10, 3, 1, 4, 67, 3)
    params = inspect.signature(dense_crf).parameters
    defaults = {k: params[k].default for k in ("iterations", "gaussian_sxy", "gaussian_w",
                                               "bilateral_sxy", "bilateral_srgb", "bilateral_w")}
    assert defaults == {"iterations": 10, "gaussian_sxy": 1, "gaussian_w": 3, "bilateral_sxy": 67,
                        "bilateral_srgb": 3, "bilateral_w": 4}


def test_rv10_wrong_patch_corrected_and_band_follows_edge():
    logits = _rv10_logits()
    before = logits.argmax(0)
    assert (before[8:12, 4:8] == 1).all()  # the unary alone is wrong on the patch
    q = dense_crf(_rv10_image(), logits)
    assert q.dtype == np.float32 and q.shape == (2, H, W)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert q.sum() == pytest.approx(H * W, abs=1e-2)
    np.testing.assert_array_equal(q.argmax(0), _expected_map())


def test_rv10_flat_cluster_unary_is_dominated_by_pairwise_terms():
    import torch
    import torch.nn.functional as F

    cos = np.zeros((2, H, W), np.float32)
    cos[0, :, :16], cos[1, :, :16] = 0.5, 0.3  # typical, nearly tied cosine similarities
    cos[0, :, 16:], cos[1, :, 16:] = 0.3, 0.5
    cos[0, 8:12, 4:8], cos[1, 8:12, 4:8] = -1.0, 1.0  # maximally wrong patch
    unary = F.log_softmax(2 * torch.from_numpy(cos), dim=0)
    assert torch.softmax(unary, 0).max(0).values[0, 0] < 0.6  # alpha=2 gives a flat unary
    q = dense_crf(_rv10_image(), unary)
    np.testing.assert_array_equal(q.argmax(0), _expected_map())
    assert q.max(0)[0, 0] > 0.9  # the CRF output is confident where the unary was not


def test_resize_matches_torch_and_low_res_logits():
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    for size in ((10, 14), (32, 32), (3, 4), (5, 7)):
        ref = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(resize_bilinear(x, size), ref.numpy(), atol=1e-6)
    small = _rv10_logits()[:, ::4, ::4].copy()  # [2, 8, 8] → resized to the image
    q = dense_crf(_rv10_image(), torch.from_numpy(small))
    assert q.shape == (2, H, W)
    assert (q.argmax(0)[:, :12] == 0).all() and (q.argmax(0)[:, 20:] == 1).all()


def test_input_errors():
    with pytest.raises(InputError, match="image"):
        dense_crf(np.zeros((4, 4, 3), np.float32), np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="logits"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="NaN"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), np.nan, np.float32))
    with pytest.raises(ConfigError, match="n_items"):
        crf_map(_load, workers=1, timeout_s=1)
    with pytest.raises(ConfigError, match="timeout_s"):
        crf_map([], workers=1, timeout_s=0)


def _item(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    return img, rng.normal(size=(3, 6, 8)).astype(np.float32)


def _load(i: int) -> tuple[np.ndarray, np.ndarray]:
    return _item(i)


def _faulty_load(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Test hook: item 2 hangs, item 3 kills its worker, item 4 raises."""
    if i == 2:
        time.sleep(60)
    if i == 3:
        os._exit(3)
    if i == 4:
        raise ValueError("unreadable item")
    return _item(i)


def test_serial_and_errors_reported():
    seen = []
    res = crf_map(_load, n_items=2, workers=1, timeout_s=5, progress=False, on_result=seen.append)
    assert [r.index for r in res] == [0, 1] and all(r.ok for r in res) and len(seen) == 2
    np.testing.assert_array_equal(res[1].marginals, dense_crf(*_item(1)))
    bad = crf_map([_item(0), (np.zeros((2, 2), np.uint8), np.zeros((3, 2, 2), np.float32))],
                  workers=0, timeout_s=5, progress=False)
    assert bad[0].ok and not bad[1].ok and "InputError" in bad[1].error and bad[1].marginals is None


@pytest.mark.faults
def test_pool_equals_serial_and_survives_hang_crash_and_error():
    import torch  # the caller has torch loaded: spawn-mode workers must still work

    assert torch.tensor(1).item() == 1
    items = [_item(i) for i in range(4)]
    serial = crf_map(items, workers=1, timeout_s=5, progress=False, iterations=5)
    pooled = crf_map(items, workers=2, timeout_s=5, progress=False, iterations=5)
    for s, p in zip(serial, pooled, strict=True):
        assert p.ok and s.index == p.index
        np.testing.assert_array_equal(s.marginals, p.marginals)

    seen = []
    start = time.monotonic()
    res = crf_map(_faulty_load, n_items=6, workers=2, timeout_s=1.5, progress=False,
                  on_result=lambda r: seen.append(r.index))
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed  # the hanging item did not block the call (it sleeps 60 s)
    assert [r.index for r in res] == list(range(6)) and sorted(seen) == list(range(6))
    assert "timed out" in res[2].error and res[2].marginals is None
    assert "worker died (exit code 3)" in res[3].error
    assert "unreadable item" in res[4].error
    for i in (0, 1, 5):
        assert res[i].ok
        np.testing.assert_array_equal(res[i].marginals, dense_crf(*_item(i)))
