"""Fuzz cases (:mod:`tests.fuzzing`) for manifests, Squirrel records, STEGO checkpoints and label PNGs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.artifacts import MANIFEST, ArtifactStore, artifact_id
from tests.fuzzing import FuzzCase, fuzz_case

MANIFEST_ID = artifact_id("toy", "1", {"n": 3, "name": "x"}, {})


@fuzz_case("manifest")
def manifest_case(workdir: Path) -> FuzzCase:
    """A published artifact's ``manifest.json``, read through :meth:`ArtifactStore.manifest`."""
    store = ArtifactStore(workdir / "root")
    staging = store.staging(MANIFEST_ID, fresh=True)
    (staging.dir / "data.bin").write_bytes(b"payload")
    published = store.publish(MANIFEST_ID, staging, {"stage": "toy", "version": "1", "params": {"n": 3, "name": "x"},
                                                     "inputs": {}, "counts": {"n": 3}})
    original = (published / MANIFEST).read_bytes()

    def write(folder: Path, data: bytes) -> ArtifactStore:
        mutated = ArtifactStore(folder)
        directory = mutated.path(MANIFEST_ID)
        directory.mkdir(parents=True)
        (directory / "data.bin").write_bytes(b"payload")
        (directory / MANIFEST).write_bytes(data)
        return mutated

    def read(mutated: ArtifactStore) -> Any:
        return mutated.manifest(MANIFEST_ID)

    return FuzzCase("manifest", original, write, read, expected=store.manifest(MANIFEST_ID), max_bytes=1 << 20)


def _squirrel_records() -> list[dict[str, Any]]:
    """Two records of the stego-studies schema, as msgpack-numpy maps."""
    import numpy as np

    rng = np.random.default_rng(0)
    records = []
    for i in range(2):
        arrays = {"ind": np.array([i], np.int64), "img": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
                  "label": rng.integers(-1, 5, (1, 8, 8)),
                  "dino_feats": rng.standard_normal((1, 6, 2, 2)).astype(np.float32)}
        records.append({k: {b"nd": True, b"type": v.dtype.str, b"kind": b"", b"shape": v.shape, b"data": v.tobytes()}
                        for k, v in arrays.items()})
    return records


def _squirrel_payload() -> bytes:
    import msgpack

    return b"".join(msgpack.packb(record, use_bin_type=True) for record in _squirrel_records())


def _read_squirrel(url: Path) -> list[Any]:
    """The records of shard ``000000`` as ``import_squirrel`` takes them: decoded, each checked against the
    schema and the first record's shapes."""
    from stages.store.squirrel import _check_sample, read_shard

    records, first = [], None
    for i, record in enumerate(read_shard(str(url), "000000")):
        first = _check_sample(record, f"record {i}", first)
        records.append(record)
    return records


def _squirrel_case(workdir: Path, name: str, original: bytes, compress: bool) -> FuzzCase:
    import gzip

    def write(folder: Path, data: bytes) -> Path:
        (folder / "000000.gz").write_bytes(gzip.compress(data, mtime=0) if compress else data)
        return folder

    payload = _squirrel_payload()
    (workdir / name).mkdir()
    expected = _read_squirrel(write(workdir / name, original))
    return FuzzCase(name, original, write, _read_squirrel, expected, max_bytes=20 * len(payload),
                    integrity=not compress)


@fuzz_case("squirrel-shard")
def squirrel_shard_case(workdir: Path) -> FuzzCase:
    """A Squirrel shard file (gzip of msgpack records) read by ``read_shard``: gzip's crc32 and length guard
    the bytes, so a damaged file reads back whole or is refused."""
    import gzip

    return _squirrel_case(workdir, "squirrel-shard", gzip.compress(_squirrel_payload(), mtime=0), compress=False)


@fuzz_case("squirrel-record")
def squirrel_record_case(workdir: Path) -> FuzzCase:
    """Crafted msgpack inside a valid gzip (no checksum covers it): ``read_shard`` decodes it safely or
    refuses it; different records that pass the schema check count as accepted."""
    return _squirrel_case(workdir, "squirrel-record", _squirrel_payload(), compress=True)


@fuzz_case("stego-checkpoint")
def stego_checkpoint_case(workdir: Path) -> FuzzCase:
    """A STEGO Lightning checkpoint (a torch zip of a pickle and tensor records) read by
    ``read_stego_checkpoint``: the crc32 of every zip record, the restricted unpickler, the tensor size
    checks and the layout checks."""
    import dataclasses

    import torch

    from stages.stego.checkpoint import read_stego_checkpoint
    from tests.test_stego_checkpoint import _checkpoint

    path = workdir / "model.ckpt"
    torch.save(_checkpoint(), path)

    def write(folder: Path, data: bytes) -> Path:
        (folder / "model.ckpt").write_bytes(data)
        return folder / "model.ckpt"

    def read(target: Path) -> Any:
        return {k: v for k, v in dataclasses.asdict(read_stego_checkpoint(target)).items() if k != "path"}

    return FuzzCase("stego-checkpoint", path.read_bytes(), write, read, read(path),
                    max_bytes=4 * path.stat().st_size)


def _label_png(workdir: Path) -> tuple[bytes, bytes]:
    """A 24x32 label PNG (values 0..5) and its 24x32 RGB image, as PNG bytes."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for array in (rng.integers(0, 6, (24, 32)).astype(np.uint8), rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files[0], files[1]


@fuzz_case("label-png")
def label_png_case(workdir: Path) -> FuzzCase:
    """A folder dataset's label PNG read as ``extract`` reads it: through the reader, checked against the
    sha256 that ``prepare`` recorded in the index."""
    import hashlib

    from stages.datasets.base import SampleRef
    from stages.datasets.folder import FolderReader

    label, image = _label_png(workdir)
    ref = SampleRef("a", "imgs/train/a.png", "labels/train/a.png")

    def write(folder: Path, data: bytes) -> Any:
        (folder / "imgs" / "train").mkdir(parents=True)
        (folder / "labels" / "train").mkdir(parents=True)
        (folder / ref.image).write_bytes(image)
        (folder / ref.label).write_bytes(data)
        reader = FolderReader(folder, n_classes=4)
        reader.expect_checksums({ref.image: hashlib.sha256(image).hexdigest(),
                                 ref.label: hashlib.sha256(label).hexdigest()})
        return reader

    def read(reader: Any) -> Any:
        return reader.load_label(ref)

    (workdir / "original").mkdir()
    return FuzzCase("label-png", label, write, read, read(write(workdir / "original", label)), max_bytes=1 << 20)


@fuzz_case("label-png-decode")
def label_png_decode_case(workdir: Path) -> FuzzCase:
    """A label PNG as ``prepare`` first meets it (no checksum yet): decoded to an integer array or refused;
    PNG's chunk crc32 and zlib's adler32 catch most damage, and what they let through as other pixels
    counts as accepted."""
    from stages.datasets.base import decode_label_file

    label, _ = _label_png(workdir)

    def write(folder: Path, data: bytes) -> Path:
        (folder / "a.png").write_bytes(data)
        return folder / "a.png"

    (workdir / "original").mkdir()  # nothing knows the size yet: a damaged header may claim a bigger image
    return FuzzCase("label-png-decode", label, write, decode_label_file,
                    decode_label_file(write(workdir / "original", label)), max_bytes=32 << 20, integrity=False)
