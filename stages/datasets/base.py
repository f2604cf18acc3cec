"""Sample references, the reader base class and the shared image decoding helpers (method.md §1.6, §8).

A reader lists the samples of a split as :class:`SampleRef` rows and decodes them; crops are virtual
(boxes at full resolution), so five-crop needs no copy of the dataset on disk.
"""
from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from pipeline.errors import ConfigError, InputError

from .labelmaps import IGNORE, label_uint8_roundtrip
from .transforms import Box, five_crop_boxes

SPLITS: tuple[str, ...] = ("train", "val")
CROP_MODES: tuple[str, ...] = ("none", "five")
FIVE_CROP_RATIO = 0.5
#: PIL's default JPEG quality, used by the reference when it stored five-crops.
REFERENCE_JPEG_QUALITY = 75


@dataclass(frozen=True)
class SampleRef:
    """One row of a split's index.

    ``id`` is unique and stable within the split; ``image``/``label`` are paths relative to the
    reader's root (``label`` is None for unlabelled samples); ``crop`` is a virtual crop box
    ``(top, left, height, width)`` at full resolution, or None for the whole image.
    """

    id: str
    image: str
    label: str | None
    crop: Box | None = None


def read_checked(path: Path, sha256: str) -> BinaryIO:
    """The bytes of ``path`` (in memory) when their sha256 is ``sha256``; InputError naming the file when it
    is missing or its content changed (e.g. replaced after ``prepare`` with the same size and mtime)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"file {path} does not exist (it was indexed by prepare)") from None
    except OSError as e:
        raise InputError(f"file {path} is unreadable: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise InputError(f"file {path} changed since prepare indexed it (sha256 {digest[:16]}…, indexed "
                         f"{sha256[:16]}…); run prepare again (a new index) or restore the file")
    return io.BytesIO(data)


def decode_image_file(path: Path, source: BinaryIO | None = None) -> np.ndarray:
    """Fully decode an image file (``source``: its bytes, when already read) to uint8 RGB ``[H, W, 3]``;
    InputError naming the file on failure."""
    try:
        with Image.open(source or path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise InputError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image file {path} is unreadable or truncated: {e}") from e


def decode_label_file(path: Path, source: BinaryIO | None = None) -> np.ndarray:
    """Fully decode a single-channel label image (``source``: its bytes, when already read) to its integer
    pixel values ``[H, W]``; InputError naming the file on failure."""
    try:
        with Image.open(source or path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise InputError(f"label file {path} must be a single-channel image, got mode {im.mode}")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise InputError(f"label file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"label file {path} is unreadable or truncated: {e}") from e
    return arr.astype(np.int32) if arr.dtype == bool else arr


def image_file_size(path: Path) -> tuple[int, int]:
    """(H, W) from an image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise InputError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image file {path} is unreadable: {e}") from e
    return height, width


def jpeg_roundtrip(rgb: np.ndarray, quality: int = REFERENCE_JPEG_QUALITY) -> np.ndarray:
    """Encode uint8 RGB as JPEG (PIL defaults, given quality) and decode it again, in memory."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_id_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a split list file; InputError naming it if missing or empty."""
    if not path.is_file():
        raise InputError(f"split list {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise InputError(f"split list {path} is empty")
    if len(set(ids)) != len(ids):
        raise InputError(f"split list {path} contains duplicate ids")
    return ids


class DatasetReader(ABC):
    """Base reader: subclasses list samples and decode full-resolution images and raw labels.

    Options shared by all formats: ``crop`` ("none" or "five": five virtual crops of ratio 0.5 per
    image, ids ``{id}_c{k}``, k = 0..4 in order tl, tr, bl, br, center) and ``jpeg_roundtrip``
    (reproduce the reference's stored five-crops: quality-75 JPEG re-encode of the cropped image
    and the ``uint8(label + 1)`` label round trip; applied to cropped samples only).

    :meth:`expect_checksums` makes every later image and label read check the file's sha256 (the one
    ``prepare`` recorded) on the bytes it decodes: a file replaced since is an InputError, never other data.
    """

    name: str
    n_classes: int
    class_names: list[str]
    root: Path

    def __init__(self, root: str | Path, *, crop: str = "none", jpeg_roundtrip: bool = False) -> None:
        if crop not in CROP_MODES:
            raise ConfigError(f"dataset option crop={crop!r} is not valid; allowed: {', '.join(CROP_MODES)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"dataset root {self.root} ({self.name}) is not a directory")
        self.crop = crop
        self.jpeg_roundtrip = bool(jpeg_roundtrip)
        self.checksums: dict[str, str] = {}

    def expect_checksums(self, checksums: Mapping[str, str]) -> None:
        """Check the files ``checksums`` names (path relative to the root → sha256) on every read from now on."""
        self.checksums = dict(checksums)

    def _source(self, rel: str) -> BinaryIO | None:
        """The checked bytes of file ``rel`` when its sha256 is expected, else None (decode from the path)."""
        sha256 = self.checksums.get(rel)
        return None if sha256 is None else read_checked(self.root / rel, sha256)

    # -- format-specific hooks ------------------------------------------------------------------
    @abstractmethod
    def _list_full(self, split: str) -> list[SampleRef]:
        """Uncropped samples of ``split`` (split already validated)."""

    def _read_image(self, rel: str) -> np.ndarray:
        """Full-resolution uint8 RGB image."""
        return decode_image_file(self.root / rel, self._source(rel))

    def _image_size(self, rel: str) -> tuple[int, int]:
        """Full-resolution (H, W), read as cheaply as the format allows."""
        return image_file_size(self.root / rel)

    @abstractmethod
    def _read_label(self, rel: str) -> np.ndarray:
        """Full-resolution remapped label, int16, -1 = ignore."""

    # -- public API -----------------------------------------------------------------------------
    def list_samples(self, split: str, skipped: list[tuple[str, InputError]] | None = None) -> list[SampleRef]:
        """Samples of ``split`` ("train" or "val"); five virtual crops per image when ``crop="five"``.

        Five-crop reads each image's size: an unreadable image raises its InputError, or with ``skipped``
        given is left out and appended there as ``(id, error)``.
        """
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} is not valid for dataset {self.name}; allowed: {', '.join(SPLITS)}")
        refs = self._list_full(split)
        if self.crop == "none":
            return refs
        out: list[SampleRef] = []
        for ref in refs:
            try:
                height, width = self._image_size(ref.image)
            except InputError as exc:
                if skipped is None:
                    raise
                skipped.append((ref.id, exc))
                continue
            for k, box in enumerate(five_crop_boxes(height, width, FIVE_CROP_RATIO)):
                out.append(SampleRef(f"{ref.id}_c{k}", ref.image, ref.label, box))
        return out

    def load_image(self, ref: SampleRef) -> np.ndarray:
        """uint8 ``[H, W, 3]`` RGB with the crop applied (and the JPEG round trip when enabled)."""
        rgb = self._read_image(ref.image)
        if ref.crop is None:
            return rgb
        rgb = self._apply_crop(rgb, ref.crop, ref.image)
        return jpeg_roundtrip(rgb) if self.jpeg_roundtrip else rgb

    def load_label(self, ref: SampleRef) -> np.ndarray:
        """int16 ``[H, W]`` remapped label (-1 = ignore) with the crop applied; all -1 if unlabelled."""
        img_size = self._image_size(ref.image)
        if ref.label is None:
            label = np.full(img_size, IGNORE, dtype=np.int16)
        else:
            label = self._read_label(ref.label)
            if label.shape != img_size:
                raise InputError(
                    f"label file {self.root / ref.label} is {label.shape[0]}x{label.shape[1]} but image "
                    f"{self.root / ref.image} is {img_size[0]}x{img_size[1]}"
                )
        if ref.crop is None:
            return label
        label = self._apply_crop(label, ref.crop, ref.label or ref.image)
        return label_uint8_roundtrip(label) if self.jpeg_roundtrip else label

    def _apply_crop(self, arr: np.ndarray, box: Box, rel: str) -> np.ndarray:
        top, left, height, width = box
        h, w = arr.shape[:2]
        if top < 0 or left < 0 or height <= 0 or width <= 0 or top + height > h or left + width > w:
            raise InputError(f"crop box {box} (top, left, height, width) lies outside {self.root / rel} ({h}x{w})")
        return arr[top : top + height, left : left + width].copy()


def check_sample(reader: DatasetReader, ref: SampleRef) -> tuple[int, int]:
    """Decode image and label of ``ref`` fully; return the sample's (H, W).

    Raises InputError naming the file for unreadable/truncated files and naming both files when the
    label size differs from the image size.
    """
    image = reader.load_image(ref)
    label = reader.load_label(ref)
    if label.shape != image.shape[:2]:
        raise InputError(
            f"label {reader.root / (ref.label or '')} decodes to {label.shape} but image "
            f"{reader.root / ref.image} to {image.shape[:2]}"
        )
    return int(image.shape[0]), int(image.shape[1])
