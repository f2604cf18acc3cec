"""Dataset names -> reader constructors."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

from .base import DatasetReader
from .cityscapes import CityscapesReader
from .cocostuff import CocoStuff27Reader
from .folder import FolderReader
from .potsdam import PotsdamReader
from .synthetic import SYNTHETIC_CLASS_NAMES


class SyntheticReader(FolderReader):
    """The folder reader with the synthetic dataset's five classes fixed."""

    name = "synthetic"

    def __init__(self, root: str | Path, *, crop: str = "none", jpeg_roundtrip: bool = False) -> None:
        super().__init__(root, n_classes=len(SYNTHETIC_CLASS_NAMES), class_names=SYNTHETIC_CLASS_NAMES,
                         crop=crop, jpeg_roundtrip=jpeg_roundtrip)


_READERS: dict[str, type[DatasetReader]] = {
    "cocostuff27": CocoStuff27Reader,
    "cityscapes": CityscapesReader,
    "potsdam": PotsdamReader,
    "folder": FolderReader,
    "synthetic": SyntheticReader,
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`get_reader`."""
    return list(_READERS)


def get_reader(name: str, root: str | Path, **options: Any) -> DatasetReader:
    """Reader for dataset ``name`` at ``root``; options: ``crop``, ``jpeg_roundtrip`` and, for
    ``folder``, ``n_classes`` / ``class_names``. ConfigError for an unknown name or option."""
    if name not in _READERS:
        raise ConfigError(f"dataset name {name!r} is not known; allowed: {', '.join(_READERS)}")
    cls = _READERS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return cls(root, **options)


def reader_options(dataset: Any, split: str) -> dict[str, Any]:
    """Reader constructor options for a split (five-crop only ever applies to train)."""
    options: dict[str, Any] = {"crop": dataset.train_crop if split == "train" else "none",
                               "jpeg_roundtrip": bool(dataset.jpeg_roundtrip)}
    if dataset.name == "folder":
        options["n_classes"] = int(dataset.n_classes)
        if dataset.class_names is not None:
            options["class_names"] = list(dataset.class_names)
    return options
