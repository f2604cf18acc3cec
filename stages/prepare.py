"""``prepare`` stage: a dataset on disk → an ``index`` artifact.

``prepare`` lists one split of a dataset through its reader, decodes every image and
label once to validate them, checksums the files and writes ``index.json``: one row per sample (id,
image path + sha256, virtual crop box, label path + sha256, size) plus what is needed to reopen the
reader. Bad inputs raise one :class:`InputError` naming the file, or with ``on_bad_input=skip`` are
left out and listed with reasons in the manifest.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.artifacts import sha256_file, write_json_atomic
from pipeline.config import register_section, setting
from pipeline.errors import ConfigError, InputError
from pipeline.params import Context, Derive, Exclude, Params
from pipeline.context import StageContext
from pipeline.planner import Request
from pipeline.registry import Need, register_needs, register_stage
from stages.datasets.base import SPLITS, DatasetReader, SampleRef, check_sample
from stages.datasets.index import INDEX_FILE
from stages.datasets.registry import dataset_names, get_reader, reader_options


@dataclass
class SyntheticConfig:
    """The built-in synthetic dataset (``dataset.synthetic.*``, read by the ``synthesize`` stage)."""

    n_train: int = setting(48, min=1)
    n_val: int = setting(16, min=1)
    height: int = setting(96, min=8)
    width: int = setting(128, min=8)
    seed: int = 0


@dataclass
class DatasetConfig:
    """Which dataset and how to read it (``dataset.*``)."""

    name: str = setting("synthetic", choices=dataset_names)  # a registered reader (stages/datasets/registry.py)
    root: str | None = setting(None, path=True)  # dataset root on disk (unused for synthetic)
    n_classes: int | None = None  # folder datasets only
    class_names: list[str] | None = None  # folder datasets only
    train_crop: str = setting("none", choices=("none", "five"))  # five: virtual five-crops of train, ratio 0.5
    jpeg_roundtrip: bool = False  # reproduce the reference's JPEG-75 five-crop re-encode
    on_bad_input: str = setting("error", choices=("error", "skip"))
    check_workers: int = setting(4, runtime=True, min=1)  # threads decoding and checksumming samples
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


register_section("dataset", DatasetConfig)


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


def prepare_inputs(cfg: Any, args: dict[str, Any]) -> dict[str, Request]:
    return {"data": Request("synthesize", cfg)} if cfg.dataset.name == "synthetic" else {}


def _check(cfg: Any, args: dict[str, Any]) -> None:
    dataset = cfg.dataset
    if args["split"] not in SPLITS:
        raise ConfigError(f"split={args['split']!r}: expected one of {', '.join(SPLITS)}")
    if dataset.name == "folder" and not dataset.root:
        raise ConfigError("dataset.root is required for dataset.name=folder: your folder holding imgs/train/, "
                          "imgs/val/ (and optionally labels/train/, labels/val/), e.g. `stegopipe run prepare "
                          "--preset folder dataset.root=mine` or `make prepare DATASET=folder ARGS=\"dataset.root=mine\"`")
    if dataset.name != "synthetic" and not dataset.root:
        raise ConfigError(f"dataset.root is required for dataset.name={dataset.name} "
                          f"(e.g. `make prepare DATASET={dataset.name} DATA_ROOT=/path/to/data`)")
    if dataset.name == "folder" and dataset.n_classes is None:
        raise ConfigError("dataset.n_classes is required for dataset.name=folder")


def _on_disk(cfg: Any, args: Any) -> bool:
    return cfg.dataset.name != "synthetic"


def _root(cfg: Any, args: Any) -> str:
    return str(Path(cfg.dataset.root).expanduser().resolve())


PREPARE_PARAMS = Params(
    exclude=(
        Exclude(("dataset.synthetic.*",), "the synthesize stage reads them; its artifact (an input) covers them"),
        Exclude(("dataset.root",), "dataset.name=synthetic reads the synthesize artifact, not a folder",
                when=lambda cfg, args: not _on_disk(cfg, args)),
        Exclude(("dataset.train_crop",), "five-crops apply to the train split only",
                when=lambda cfg, args: args["split"] != "train"),
        Exclude(("dataset.n_classes", "dataset.class_names"), "only the folder dataset takes its classes from "
                "the config", when=lambda cfg, args: cfg.dataset.name != "folder"),
    ),
    derive=(
        Derive("root", _root, replaces=("dataset.root",), when=_on_disk),
        Derive("fingerprint", lambda cfg, args: tree_fingerprint(Path(_root(cfg, args))), uses=("dataset.root",),
               when=_on_disk),
    ),
    check=_check,
    contexts=(Context(args={"split": "train"}), Context(args={"split": "val"}),
              Context(("dataset.name=folder", "dataset.root={data}", "dataset.n_classes=3"), {"split": "train"}),
              Context(("dataset.name=folder", "dataset.root={data}", "dataset.n_classes=3"), {"split": "val"})))


def tree_fingerprint(root: Path) -> str | None:
    """Digest of every file's relative path, size and mtime under ``root`` (None if it is missing).

    Part of the prepare params, so an edited, added or removed file gives a new index id. A file name that
    is not valid UTF-8 counts by its bytes; a dangling symlink or a symlink loop is an InputError naming it.
    """
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            try:
                stat = os.stat(path)
            except OSError as exc:
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                what = "a dangling symlink" if os.path.islink(path) and isinstance(exc, FileNotFoundError) else \
                    f"unreadable ({exc.strerror or exc})"
                raise InputError(f"dataset file {shown} is {what}; remove or fix it") from None
            rel = os.fsencode(os.path.relpath(path, root))
            digest.update(rel + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@cache
def _file_digest(path: Path) -> str:
    return sha256_file(path)


def _check(reader: DatasetReader, ref: SampleRef) -> dict[str, Any]:
    size = check_sample(reader, ref)
    row = asdict(ref)
    row["size"] = list(size)
    row["image_sha256"] = _file_digest(reader.root / ref.image)
    row["label_sha256"] = _file_digest(reader.root / ref.label) if ref.label else None
    return row


DATA_ROOT_SETTING = ("dataset.root=PATH (the paper presets read it from DATA_ROOT=DIR for make, or the "
                     "environment variable STEGOPIPE_DATA_ROOT: the folder holding cocostuff/, cityscapes/, potsdam/)")
FOLDER_ROOT_SETTING = "dataset.root=PATH (your folder holding imgs/train/, imgs/val/ and optionally labels/)"


def prepare_needs(cfg: Any, args: dict[str, Any]) -> list[Need]:
    """The dataset root on disk (none for the generated synthetic dataset)."""
    if cfg.dataset.name == "synthetic" or not cfg.dataset.root:
        return []
    root = Path(cfg.dataset.root).expanduser().absolute()
    setting = FOLDER_ROOT_SETTING if cfg.dataset.name == "folder" else DATA_ROOT_SETTING
    return [Need("data root", str(root), setting, root.is_dir())]


register_needs("prepare", prepare_needs)


@register_stage("prepare", kind="index", sections=("dataset",), params=PREPARE_PARAMS, inputs=prepare_inputs,
                args={"split": "train"}, make_target="make prepare")
def prepare(ctx: StageContext) -> None:
    """Index and validate one split of a dataset."""
    dataset, split = ctx.config.dataset, ctx.args["split"]
    options = reader_options(dataset, split)
    root = ctx.input("data").path if "data" in ctx.inputs else Path(ctx.params["root"])
    if not root.is_dir():
        raise InputError(f"dataset root {root} does not exist or is not a directory")
    reader = get_reader(dataset.name, root, **options)
    unlisted: list[tuple[str, InputError]] = []
    refs = reader.list_samples(split, unlisted if dataset.on_bad_input == "skip" else None)
    rows: list[dict[str, Any]] = []
    skipped = [{"id": sample, "reason": str(exc)} for sample, exc in unlisted]
    if not refs and not skipped:
        raise InputError(f"{root}: split '{split}' of dataset {dataset.name} lists no samples")
    workers = int(ctx.runtime.dataset.check_workers)

    def checked(ref: SampleRef) -> dict[str, Any] | InputError:
        try:
            return _check(reader, ref)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(workers) as pool:
        for ref, row in tqdm(zip(refs, pool.map(checked, refs)), total=len(refs), unit="img",
                             desc=f"prepare {dataset.name}/{split}", leave=False):
            if isinstance(row, InputError):
                if dataset.on_bad_input == "error":
                    raise InputError(f"{row} (set dataset.on_bad_input=skip to leave such samples out)")
                skipped.append({"id": ref.id, "reason": str(row)})
            else:
                rows.append(row)
    if not rows:
        raise InputError(f"{root}: every sample of split '{split}' is bad; first: {skipped[0]['reason']}")
    index = {"dataset": dataset.name, "split": split, "root": str(root), "options": options,
             "n_classes": reader.n_classes, "class_names": list(reader.class_names), "samples": rows}
    write_json_atomic(ctx.out / INDEX_FILE, index)
    ctx.record(counts={"samples": len(rows), "skipped": len(skipped)}, skipped=skipped)
