"""Directory ("folder") dataset reader (method.md §8.4): ``imgs/{split}/*`` with optional ``labels/{split}/*.png``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, InputError

from .base import DatasetReader, SampleRef, decode_label_file
from .labelmaps import folder_remap

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def _files_by_stem(folder: Path, extensions: frozenset[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        try:
            f.name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(f).decode("utf-8", "backslashreplace")
            raise InputError(f"file {shown}: its name is not valid UTF-8; rename it") from None
        if f.is_file() and f.suffix.lower() in extensions:
            if f.stem in out:
                raise InputError(f"folder {folder} holds two files with stem {f.stem!r}: {out[f.stem].name}, {f.name}")
            out[f.stem] = f
    return out


class FolderReader(DatasetReader):
    """A custom dataset: images ``imgs/{split}/*`` (sorted; id = file stem) and, optionally, label PNGs
    ``labels/{split}/{stem}.png`` whose pixel value is the class id (values >= ``n_classes`` -> -1).

    Without a ``labels/{split}`` folder every sample is unlabelled (label all -1).
    """

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        *,
        n_classes: int | None = None,
        class_names: list[str] | None = None,
        crop: str = "none",
        jpeg_roundtrip: bool = False,
    ) -> None:
        if n_classes is None or isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ConfigError(f"dataset option n_classes={n_classes!r} is not valid for the folder dataset; "
                              "allowed: a positive integer (the number of label classes)")
        if class_names is not None and len(class_names) != n_classes:
            raise ConfigError(f"dataset option class_names has {len(class_names)} names but n_classes={n_classes}")
        super().__init__(root, crop=crop, jpeg_roundtrip=jpeg_roundtrip)
        self.n_classes = n_classes
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n_classes)]

    def _list_full(self, split: str) -> list[SampleRef]:
        img_dir = self.root / "imgs" / split
        if not img_dir.is_dir():
            raise InputError(f"image folder {img_dir} does not exist")
        images = _files_by_stem(img_dir, IMAGE_EXTENSIONS)
        if not images:
            raise InputError(f"image folder {img_dir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        label_dir = self.root / "labels" / split
        if not label_dir.is_dir():
            return [SampleRef(stem, f"imgs/{split}/{p.name}", None) for stem, p in images.items()]
        labels = _files_by_stem(label_dir, frozenset({".png"}))
        missing = sorted(set(images) - set(labels))
        extra = sorted(set(labels) - set(images))
        if missing or extra:
            raise InputError(
                f"label folder {label_dir} does not match image folder {img_dir}: "
                f"no label for {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"no image for {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        return [
            SampleRef(stem, f"imgs/{split}/{p.name}", f"labels/{split}/{labels[stem].name}")
            for stem, p in images.items()
        ]

    def _read_label(self, rel: str) -> np.ndarray:
        return folder_remap(decode_label_file(self.root / rel, self._source(rel)), self.n_classes)
