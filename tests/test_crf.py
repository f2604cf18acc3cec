"""Dense CRF: reference constants, the reference's pixels (round trip + BGR) checked against a torch
re-enactment of the reference, RV10 (edge-following refinement), pool runner vs serial, timeouts.

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
from stages.evaluation.crf import (
    BI_RGB_STD, BI_W, BI_XY_STD, MAX_ITER, POS_W, POS_XY_STD, crf_map, crf_pixels, dense_crf, reference_pixels,
    resize_bilinear,
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
    np.testing.assert_allclose(q, _torch_reference_crf(_rv10_image(), logits), atol=1e-5)
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


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _torch_reference_pixels(image: np.ndarray) -> np.ndarray:
    """The reference's route in torch: ToTensor + Normalize (the val loader), then the CRF wrapper's
    un-normalise (in-place ``mul_(std).add_(mean)`` per channel) and ``to_pil_image`` (``mul(255).byte()``)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as VF

    x = T.Normalize(*IMAGENET)(T.ToTensor()(image)).clone()
    for channel, mean, std in zip(x, *IMAGENET, strict=True):
        channel.mul_(std).add_(mean)
    return np.array(VF.to_pil_image(x))


def _torch_reference_crf(image: np.ndarray, logits: np.ndarray, bgr: bool = True) -> np.ndarray:
    """Spec §7 step by step with torch and pydensecrf.utils (``bgr=False``: the same in RGB order)."""
    import pydensecrf.densecrf as dcrf
    import torch
    import torch.nn.functional as F
    from pydensecrf.utils import unary_from_softmax

    pixels = _torch_reference_pixels(image)
    rgbim = np.ascontiguousarray(pixels[:, :, ::-1] if bgr else pixels)
    height, width = rgbim.shape[:2]
    lg = F.interpolate(torch.from_numpy(logits)[None], size=(height, width), mode="bilinear",
                       align_corners=False)[0]
    probs = F.softmax(lg, dim=0).numpy()
    crf = dcrf.DenseCRF2D(width, height, probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=rgbim, compat=4)
    return np.array(crf.inference(10), dtype=np.float32).reshape(probs.shape)


def _blocky_image(seed: int, height: int, width: int) -> np.ndarray:
    """Random colour blocks with a little noise: edges the bilateral kernel can follow."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    img = np.kron(blocks, np.ones((-(-height // 4), -(-width // 4), 1), np.uint8))[:height, :width]
    return np.clip(img.astype(int) + rng.integers(-6, 7, size=img.shape), 0, 255).astype(np.uint8)


def test_reference_pixels_are_bit_identical_to_torch():
    every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # all 256 × 3 channels
    images = [every_value] + [np.random.default_rng(i).integers(0, 256, (17, 23, 3), dtype=np.uint8)
                              for i in range(3)]
    for img in images:
        np.testing.assert_array_equal(reference_pixels(img), _torch_reference_pixels(img))
    lower = reference_pixels(every_value).astype(int) - every_value
    assert lower.max() == 0 and (lower == -1).sum() > 50  # truncation: many values come out one lower
    bgr = crf_pixels(every_value)
    assert bgr.flags["C_CONTIGUOUS"] and (bgr[:, :, ::-1] == reference_pixels(every_value)).all()
    assert (crf_pixels(every_value, "raw") == every_value[:, :, ::-1]).all()
    with pytest.raises(ConfigError, match="pixels='bgr'"):
        crf_pixels(every_value, "bgr")


@pytest.mark.parametrize(("seed", "n_classes", "size", "half"),
                         [(0, 2, (24, 20), False), (1, 3, (24, 20), True), (2, 5, (32, 28), True),
                          (3, 4, (20, 32), False)])
def test_dense_crf_equals_the_torch_reference(seed, n_classes, size, half):
    """Several images and class counts; half-resolution logits exercise the internal bilinear resize."""
    rng = np.random.default_rng(100 + seed)
    image = _blocky_image(seed, *size)
    grid = (size[0] // 2, size[1] // 2) if half else size
    logits = rng.normal(scale=2.0, size=(n_classes, *grid)).astype(np.float32)
    ref = _torch_reference_crf(image, logits)
    np.testing.assert_allclose(dense_crf(image, logits), ref, atol=1e-4)


def test_channel_order_and_truncation_change_the_result():
    """The case the BGR order and the round trip exist for: RGB order (or raw pixels) is measurably off."""
    image = _blocky_image(1, 24, 20)
    logits = np.random.default_rng(101).normal(scale=2.0, size=(3, 24, 20)).astype(np.float32)
    q = dense_crf(image, logits)
    np.testing.assert_allclose(q, _torch_reference_crf(image, logits), atol=1e-4)
    rgb_order = _torch_reference_crf(image, logits, bgr=False)
    assert np.abs(q - rgb_order).max() > 0.1 and (q.argmax(0) != rgb_order.argmax(0)).any()
    raw = dense_crf(image, logits, pixels="raw")
    assert np.abs(q - raw).max() > 0.1


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


def test_pool_is_byte_identical_to_serial_for_any_logits_layout():
    """Items larger than a pipe buffer (the sender thread must not stall the pool), with transposed,
    non-C-contiguous logits: a worker gets them unpickled in C order, so the softmax must not depend on
    the layout (it did: the class sums rounded differently)."""
    rng = np.random.default_rng(7)
    items = [(_blocky_image(i, 64, 48), rng.normal(scale=2.0, size=(48, 64, 6)).astype(np.float32).transpose(2, 1, 0))
             for i in range(5)]
    assert not items[0][1].flags["C_CONTIGUOUS"] and items[0][1].nbytes > 65536
    serial = crf_map(items, workers=1, timeout_s=30, progress=False, iterations=3)
    pooled = crf_map(items, workers=2, timeout_s=30, progress=False, iterations=3)
    for (image, logits), s, p in zip(items, serial, pooled, strict=True):
        assert s.ok and p.ok, (s.error, p.error)
        np.testing.assert_array_equal(s.marginals, p.marginals)
        np.testing.assert_array_equal(s.marginals, dense_crf(image, np.ascontiguousarray(logits), iterations=3))


def _first_hangs_load(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Test hook: item 0 hangs (the worker holding it also holds item 1 queued behind it)."""
    if i == 0:
        time.sleep(60)
    return _item(i)


@pytest.mark.faults
def test_item_queued_behind_a_hung_one_is_requeued_not_failed():
    res = crf_map(_first_hangs_load, n_items=5, workers=2, timeout_s=1.5, progress=False)
    assert "timed out" in res[0].error
    for i in range(1, 5):
        assert res[i].ok, res[i].error
        np.testing.assert_array_equal(res[i].marginals, dense_crf(*_item(i)))
