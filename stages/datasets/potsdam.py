"""potsdam (Potsdam-3) reader (method.md §8.3): IIC ``.mat`` tiles, 6 -> 3 classes."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import InputError
from pipeline.lazy import lazy_module

from .base import DatasetReader, SampleRef, read_id_list
from .labelmaps import POTSDAM3_CLASS_NAMES, potsdam_remap

scipy_io = lazy_module("scipy.io")

POTSDAM_LISTS: dict[str, str] = {"train": "labelled_train.txt", "val": "labelled_test.txt"}


def read_mat_array(path: Path, key: str, source: BinaryIO | None = None) -> np.ndarray:
    """Array ``key`` of a MATLAB file (``source``: its bytes, when already read); InputError naming the file
    (and key) when missing or unreadable."""
    if source is None and not path.is_file():
        raise InputError(f"potsdam file {path} does not exist")
    try:
        data = scipy_io.loadmat(source or path, variable_names=[key])
    except Exception as e:  # scipy raises many types for corrupt/truncated files
        raise InputError(f"potsdam file {path} is unreadable or truncated: {e}") from e
    if key not in data:
        raise InputError(f"potsdam file {path} has no key {key!r}")
    return np.asarray(data[key])


class PotsdamReader(DatasetReader):
    """``imgs/{id}.mat`` (key ``img``, uint8 HxWx4, channels 0..2 kept), ``gt/{id}.mat`` (key ``gt``, 0..5);
    split lists ``labelled_train.txt`` (train) and ``labelled_test.txt`` (val)."""

    name = "potsdam"
    n_classes = 3
    class_names = POTSDAM3_CLASS_NAMES

    def _list_full(self, split: str) -> list[SampleRef]:
        ids = read_id_list(self.root / POTSDAM_LISTS[split])
        return [SampleRef(i, f"imgs/{i}.mat", f"gt/{i}.mat") for i in ids]

    def _read_image(self, rel: str) -> np.ndarray:
        path = self.root / rel
        img = read_mat_array(path, "img", self._source(rel))
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] < 3:
            raise InputError(f"potsdam file {path}: key 'img' must be uint8 HxWx(>=3), got {img.dtype} {img.shape}")
        return np.ascontiguousarray(img[:, :, :3])

    def _image_size(self, rel: str) -> tuple[int, int]:
        shape = self._read_image(rel).shape
        return int(shape[0]), int(shape[1])

    def _read_label(self, rel: str) -> np.ndarray:
        path = self.root / rel
        gt = read_mat_array(path, "gt", self._source(rel))
        if gt.ndim != 2 or not np.issubdtype(gt.dtype, np.integer):
            raise InputError(f"potsdam file {path}: key 'gt' must be an integer HxW array, got {gt.dtype} {gt.shape}")
        return potsdam_remap(gt)
