"""cityscapes reader (method.md §8.2): fine annotations, 27 classes = labelIds 7..33."""
from __future__ import annotations

import numpy as np

from pipeline.errors import InputError

from .base import DatasetReader, SampleRef, decode_label_file
from .labelmaps import CITYSCAPES27_CLASS_NAMES, cityscapes_remap

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class CityscapesReader(DatasetReader):
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with ``gtFine/{split}/{city}/*_gtFine_labelIds.png``.

    Samples are sorted by city then file name; the id is the file stem without ``_leftImg8bit``.
    """

    name = "cityscapes"
    n_classes = 27
    class_names = CITYSCAPES27_CLASS_NAMES

    def _list_full(self, split: str) -> list[SampleRef]:
        img_dir = self.root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise InputError(f"cityscapes image folder {img_dir} does not exist")
        refs: list[SampleRef] = []
        for city in sorted(p.name for p in img_dir.iterdir() if p.is_dir()):
            for f in sorted((img_dir / city).glob(f"*{IMAGE_SUFFIX}")):
                base = f.name[: -len(IMAGE_SUFFIX)]
                label = f"gtFine/{split}/{city}/{base}{LABEL_SUFFIX}"
                if not (self.root / label).is_file():
                    raise InputError(f"cityscapes label file {self.root / label} does not exist (for image {f})")
                refs.append(SampleRef(base, f"leftImg8bit/{split}/{city}/{f.name}", label))
        if not refs:
            raise InputError(f"cityscapes image folder {img_dir} holds no */*{IMAGE_SUFFIX} files")
        return refs

    def _read_label(self, rel: str) -> np.ndarray:
        return cityscapes_remap(decode_label_file(self.root / rel, self._source(rel)))
