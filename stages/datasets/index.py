"""The ``index`` artifact's content: a prepared split (the ``prepare`` stage writes it, ``extract`` and the
benchmarks read it with :func:`load_index`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import DatasetReader, SampleRef
from .registry import get_reader

INDEX_FILE = "index.json"
"""One row per sample (id, image + sha256, crop box, label + sha256, size) and the reader's name, root and
options."""


@dataclass
class Index:
    """A prepared split: the reader to load samples with and the sample rows."""

    dataset: str
    split: str
    n_classes: int
    class_names: list[str]
    reader: DatasetReader
    samples: list[SampleRef]
    sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.samples)


def load_index(artifact_dir: Path, *, verify_files: bool = True) -> Index:
    """Open an ``index`` artifact (and the reader it was built with). With ``verify_files`` every image and
    label the reader decodes is checked against the sha256 the index records (``extract.verify_files``)."""
    data = json.loads((Path(artifact_dir) / INDEX_FILE).read_text())
    reader = get_reader(data["dataset"], data["root"], **data["options"])
    if verify_files:
        reader.expect_checksums({**{s["image"]: s["image_sha256"] for s in data["samples"]},
                                 **{s["label"]: s["label_sha256"] for s in data["samples"] if s["label"]}})
    samples = [SampleRef(s["id"], s["image"], s["label"], tuple(s["crop"]) if s["crop"] else None)
               for s in data["samples"]]
    return Index(data["dataset"], data["split"], data["n_classes"], data["class_names"], reader, samples,
                 [tuple(s["size"]) for s in data["samples"]])
