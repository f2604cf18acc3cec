"""Image/label geometry and normalisation of the reference preprocessing (method.md §1.5, §1.6).

Pure functions on numpy arrays (no I/O). They reproduce torchvision on PIL images exactly:
``Resize(res, NEAREST)`` (shorter side -> ``res``, longer side ``int(res*long/short)``, Pillow's
nearest-neighbour sampling), ``CenterCrop(res)`` (offsets ``int(round((H'-res)/2))``, banker's
rounding), ``ToTensor`` + ``Normalize`` with the ImageNet constants, and ``five_crop`` boxes.
Arrays are laid out ``[H, W, ...]`` (any trailing channel dims, any dtype) unless stated otherwise.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import InputError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # (top, left, height, width)


def resize_shorter_size(height: int, width: int, res: int) -> tuple[int, int]:
    """Output size (H', W') of torchvision ``Resize(res)``: shorter side ``res``, longer ``int(res*long/short)``."""
    if height <= 0 or width <= 0 or res <= 0:
        raise InputError(f"resize: image size {height}x{width} and target {res} must all be positive")
    if height <= width:
        return res, int(res * width / height)
    return int(res * height / width), res


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output position of Pillow's NEAREST resize along one axis.

    Pillow samples at ``floor((i + 0.5) * n_in / n_out)`` but accumulates the position by repeated
    float64 addition; the cumulative sum below reproduces that rounding bit for bit.
    """
    scale = n_in / n_out
    steps = np.full(n_out, scale, dtype=np.float64)
    steps[0] = 0.5 * scale
    return np.minimum(np.floor(np.cumsum(steps)).astype(np.int64), n_in - 1)


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of ``arr[H, W, ...]`` to ``[height, width, ...]`` (Pillow semantics)."""
    if arr.ndim < 2:
        raise InputError(f"resize: array must be [H, W, ...], got shape {arr.shape}")
    h, w = arr.shape[:2]
    if (h, w) == (height, width):
        return arr.copy()
    rows = _nearest_index(h, height)
    cols = _nearest_index(w, width)
    return arr[rows[:, None], cols[None, :]]


def resize_shorter_nearest(arr: np.ndarray, res: int) -> np.ndarray:
    """torchvision ``Resize(res, interpolation=NEAREST)`` of ``arr[H, W, ...]``."""
    if arr.ndim < 2:
        raise InputError(f"resize: array must be [H, W, ...], got shape {arr.shape}")
    return resize_nearest(arr, *resize_shorter_size(arr.shape[0], arr.shape[1], res))


def center_crop_offset(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision ``CenterCrop(size)``: ``int(round((H - size) / 2))`` per axis."""
    if size > height or size > width:
        raise InputError(f"center crop: crop {size} is larger than the image {height}x{width}")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` of ``arr[H, W, ...]`` (square crop, no padding)."""
    if arr.ndim < 2:
        raise InputError(f"center crop: array must be [H, W, ...], got shape {arr.shape}")
    top, left = center_crop_offset(arr.shape[0], arr.shape[1], size)
    return arr[top : top + size, left : left + size].copy()


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[Box]:
    """Five-crop boxes (top, left, h, w) in torchvision order tl, tr, bl, br, center.

    Crop size is ``(int(H*ratio), int(W*ratio))``; the center box uses ``CenterCrop`` rounding.
    """
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"five crop: ratio {ratio} must be in (0, 1]")
    ch, cw = int(height * ratio), int(width * ratio)
    if ch <= 0 or cw <= 0:
        raise InputError(f"five crop: image {height}x{width} is too small for ratio {ratio}")
    center_top = int(round((height - ch) / 2.0))
    center_left = int(round((width - cw) / 2.0))
    return [
        (0, 0, ch, cw),
        (0, width - cw, ch, cw),
        (height - ch, 0, ch, cw),
        (height - ch, width - cw, ch, cw),
        (center_top, center_left, ch, cw),
    ]


def preprocess_image(rgb: np.ndarray, res: int) -> np.ndarray:
    """Reference image transform: resize shorter side (nearest), center crop, /255, ImageNet-normalise.

    ``rgb``: uint8 ``[H, W, 3]``. Returns float32 ``[3, res, res]``.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"preprocess_image: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    crop = center_crop(resize_shorter_nearest(rgb, res), res)
    x = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def preprocess_label(label: np.ndarray, res: int) -> np.ndarray:
    """Reference label transform: resize shorter side (nearest) and center crop; dtype preserved.

    ``label``: integer ``[H, W]``. Returns ``[res, res]``.
    """
    if label.ndim != 2:
        raise InputError(f"preprocess_label: expected [H, W], got shape {label.shape}")
    return center_crop(resize_shorter_nearest(label, res), res)


def denormalize(x: np.ndarray) -> np.ndarray:
    """Inverse of the ImageNet normalisation: float ``[3, H, W]`` -> float32 in ToTensor scale (~0..1)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise InputError(f"denormalize: expected [3, H, W], got shape {x.shape}")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return x.astype(np.float32) * std + mean
