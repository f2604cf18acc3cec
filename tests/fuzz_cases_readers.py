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
