"""Reference transforms: RV7 geometry and exact parity with torchvision on PIL images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.errors import InputError
from stages.datasets.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    center_crop_offset,
    denormalize,
    five_crop_boxes,
    preprocess_image,
    preprocess_label,
    resize_shorter_nearest,
    resize_shorter_size,
)

# RV7: (H, W, res) -> resized (H', W'), center-crop (top, left)
RV7_RESIZE = [
    (480, 640, 224, (224, 298), (0, 37)),
    (480, 640, 320, (320, 426), (0, 53)),
    (640, 480, 224, (298, 224), (37, 0)),
    (427, 640, 224, (224, 335), (0, 56)),
    (427, 640, 320, (320, 479), (0, 80)),
    (1024, 2048, 320, (320, 640), (0, 160)),
    (512, 1024, 224, (224, 448), (0, 112)),
    (213, 320, 224, (224, 336), (0, 56)),
    (200, 200, 224, (224, 224), (0, 0)),
]
RV7_FIVE = [
    (480, 640, (240, 320), [(0, 0), (0, 320), (240, 0), (240, 320), (120, 160)]),
    (427, 640, (213, 320), [(0, 0), (0, 320), (214, 0), (214, 320), (107, 160)]),
    (375, 500, (187, 250), [(0, 0), (0, 250), (188, 0), (188, 250), (94, 125)]),
    (1024, 2048, (512, 1024), [(0, 0), (0, 1024), (512, 0), (512, 1024), (256, 512)]),
]


@pytest.mark.parametrize("h,w,res,resized,offset", RV7_RESIZE)
def test_rv7_resize_and_center_crop_geometry(h, w, res, resized, offset):
    assert resize_shorter_size(h, w, res) == resized
    assert center_crop_offset(*resized, res) == offset


@pytest.mark.parametrize("h,w,res,resized,offset", RV7_RESIZE)
def test_rv7_crop_picks_the_expected_window(h, w, res, resized, offset):
    # A coordinate image: after resize + crop, pixel (0, 0) must be the resized pixel at the offset.
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(np.int32)
    resized_arr = resize_shorter_nearest(coords, res)
    assert resized_arr.shape == (*resized, 2)
    out = center_crop(resized_arr, res)
    assert out.shape == (res, res, 2)
    np.testing.assert_array_equal(out[0, 0], resized_arr[offset[0], offset[1]])


@pytest.mark.parametrize("h,w,size,tops_lefts", RV7_FIVE)
def test_rv7_five_crop_boxes(h, w, size, tops_lefts):
    boxes = five_crop_boxes(h, w, 0.5)
    assert [(t, l) for t, l, _, _ in boxes] == tops_lefts
    assert all((bh, bw) == size for _, _, bh, bw in boxes)


@pytest.mark.parametrize("h,w", [(480, 640), (375, 500), (33, 17), (7, 9)])
def test_five_crop_matches_torchvision(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tv = T.FiveCrop((int(h * 0.5), int(w * 0.5)))(torch.from_numpy(arr).permute(2, 0, 1))
    for (top, left, bh, bw), crop in zip(five_crop_boxes(h, w), tv, strict=True):
        np.testing.assert_array_equal(arr[top : top + bh, left : left + bw], crop.permute(1, 2, 0).numpy())


def _tv_image(arr: np.ndarray, res: int) -> np.ndarray:
    tf = T.Compose([T.Resize(res, T.InterpolationMode.NEAREST), T.CenterCrop(res), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return tf(Image.fromarray(arr)).numpy()


def _tv_label(arr: np.ndarray, res: int) -> np.ndarray:
    tf = T.Compose([T.Resize(res, T.InterpolationMode.NEAREST), T.CenterCrop(res)])
    return np.array(tf(Image.fromarray(arr)))


SIZES = [(480, 640), (427, 640), (640, 480), (213, 320), (200, 200), (333, 517), (101, 37), (37, 101), (299, 300),
         (1024, 2048), (17, 1000)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("res", [224, 320])
def test_preprocess_image_matches_torchvision_exactly(h, w, res):
    rng = np.random.default_rng([h, w, res])
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = preprocess_image(arr, res)
    assert out.dtype == np.float32 and out.shape == (3, res, res)
    np.testing.assert_array_equal(out, _tv_image(arr, res))


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("res", [224, 320, 41])
def test_preprocess_label_matches_torchvision_exactly(h, w, res):
    rng = np.random.default_rng([h, w, res, 1])
    arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
    out = preprocess_label(arr, res)
    assert out.dtype == np.uint8 and out.shape == (res, res)
    np.testing.assert_array_equal(out, _tv_label(arr, res))


def test_resize_matches_pil_on_many_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        res = int(rng.integers(1, 400))
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
        expected = np.array(T.Resize(res, T.InterpolationMode.NEAREST)(Image.fromarray(arr)))
        np.testing.assert_array_equal(resize_shorter_nearest(arr, res), expected, err_msg=f"{h}x{w}@{res}")


def test_preprocess_label_keeps_ignore_and_dtype():
    label = np.full((10, 20), -1, dtype=np.int16)
    label[:, 10:] = 5
    out = preprocess_label(label, 4)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, np.array([[-1, -1, 5, 5]] * 4))  # resized 4x8, crop cols 2..5


def test_denormalize_inverts_preprocess():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    back = denormalize(preprocess_image(arr, 8))
    np.testing.assert_allclose(back * 255, arr.transpose(2, 0, 1), atol=1e-3)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="larger than the image"):
        center_crop(np.zeros((4, 6)), 5)
    with pytest.raises(InputError, match="uint8"):
        preprocess_image(np.zeros((4, 4, 3), dtype=np.float32), 4)
    with pytest.raises(InputError, match="ratio"):
        five_crop_boxes(10, 10, 1.5)
