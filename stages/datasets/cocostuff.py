"""cocostuff27 reader (method.md §8.1): COCO-Stuff-164k images + stuffthingmaps, IIC curated lists."""
from __future__ import annotations

import numpy as np

from .base import DatasetReader, SampleRef, decode_label_file, read_id_list
from .labelmaps import COCO27_CLASS_NAMES, coco_fine_to_coarse

#: split -> (COCO folder, curated list file); val uses the reference's subset 7 list.
COCO_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train2017", "Coco164kFull_Stuff_Coarse.txt"),
    "val": ("val2017", "Coco164kFull_Stuff_Coarse_7.txt"),
}


class CocoStuff27Reader(DatasetReader):
    """``images/{train2017,val2017}/{id}.jpg``, ``annotations/.../{id}.png`` (fine 0..181, 255 ignore),
    ``curated/{dir}/<list>.txt``; labels mapped fine -> 27 coarse classes."""

    name = "cocostuff27"
    n_classes = 27
    class_names = COCO27_CLASS_NAMES

    def _list_full(self, split: str) -> list[SampleRef]:
        folder, list_name = COCO_SPLITS[split]
        ids = read_id_list(self.root / "curated" / folder / list_name)
        return [SampleRef(i, f"images/{folder}/{i}.jpg", f"annotations/{folder}/{i}.png") for i in ids]

    def _read_label(self, rel: str) -> np.ndarray:
        return coco_fine_to_coarse(decode_label_file(self.root / rel, self._source(rel)))
