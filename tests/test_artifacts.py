"""The content-addressed store: ids, atomic publish, verify, locks, gc."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.artifacts import ArtifactStore, Lock, artifact_id, canonical_json, stage_of
from pipeline.errors import ArtifactError, MissingArtifactError


def test_id_is_content_addressed() -> None:
    base = artifact_id("extract", "1", {"a": 1, "b": [1, 2]}, {"index": "prepare-0123456789abcdef"})
    assert base.startswith("extract-") and len(base) == len("extract-") + 16
    assert base == artifact_id("extract", "1", {"b": [1, 2], "a": 1}, {"index": "prepare-0123456789abcdef"})
    assert base != artifact_id("extract", "2", {"a": 1, "b": [1, 2]}, {"index": "prepare-0123456789abcdef"})
    assert base != artifact_id("extract", "1", {"a": 2, "b": [1, 2]}, {"index": "prepare-0123456789abcdef"})
    assert base != artifact_id("extract", "1", {"a": 1, "b": [1, 2]}, {"index": "prepare-fedcba9876543210"})
    assert stage_of(base) == "extract"
    with pytest.raises(ArtifactError):
        stage_of("../etc")
    assert canonical_json({"b": 1, "a": Path("/x")}) == '{"a":"/x","b":1}'


def _publish(store: ArtifactStore, name: str = "demo", inputs: dict[str, str] | None = None) -> str:
    artifact = artifact_id("toy", "1", {"name": name}, inputs or {})
    staging = store.staging(artifact, fresh=True)
    (staging.dir / "sub").mkdir()
    (staging.dir / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (staging.dir / "out.json").write_text(json.dumps({"value": 1}))
    store.publish(artifact, staging, {"stage": "toy", "inputs": inputs or {}})
    return artifact


def test_publish_is_atomic_and_verify_finds_a_flipped_byte(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    pending = artifact_id("toy", "1", {"name": "half"}, {})
    staging = store.staging(pending, fresh=True)
    (staging.dir / "out.json").write_text("{}")
    assert not store.exists(pending) and store.ids() == []  # staged work is invisible

    artifact = _publish(store)
    assert store.exists(artifact) and store.ids() == [artifact]
    manifest = store.manifest(artifact)
    assert {f["path"] for f in manifest["files"]} == {"out.json", "sub/data.bin"}
    assert store.verify(artifact) == []

    target = store.path(artifact) / "sub" / "data.bin"
    data = bytearray(target.read_bytes())
    data[17] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = store.verify(artifact)
    assert len(problems) == 1 and "sub/data.bin" in problems[0] and "sha256" in problems[0]

    (store.path(artifact) / "stray.txt").write_text("x")
    assert any("stray.txt" in p and "not listed" in p for p in store.verify(artifact))


def test_resolve_prefix_and_missing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    artifact = _publish(store)
    assert store.resolve(artifact[:10]) == artifact
    with pytest.raises(MissingArtifactError):
        store.resolve("toy-ffff")
    with pytest.raises(MissingArtifactError):
        store.manifest("toy-0000000000000000")


def test_lock_is_exclusive_and_stale_locks_are_broken(tmp_path: Path) -> None:
    first = Lock(tmp_path / "a.lock", heartbeat_s=0.05)
    second = Lock(tmp_path / "a.lock")
    assert first.try_acquire()
    try:
        assert not second.try_acquire()
        before = (tmp_path / "a.lock").stat().st_mtime
        time.sleep(0.2)
        assert (tmp_path / "a.lock").stat().st_mtime > before  # heartbeat keeps it fresh
        with pytest.raises(ArtifactError, match="timed out"):
            second.acquire(timeout_s=0.3)
    finally:
        first.release()
    assert second.try_acquire()
    second.release()

    # a lock left by a dead process on this host is stale and gets broken
    dead = Lock(tmp_path / "b.lock")
    (tmp_path / "b.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    dead.acquire(timeout_s=2)
    dead.release()
    # an old lock of another host is stale after stale_after_s
    (tmp_path / "c.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    os.utime(tmp_path / "c.lock", (time.time() - 3600, time.time() - 3600))
    Lock(tmp_path / "c.lock", stale_after_s=60).acquire(timeout_s=2)


def test_gc_keeps_the_closure_of_kept_artifacts(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    parent = _publish(store, "parent")
    child = _publish(store, "child", {"parent": parent})
    orphan = _publish(store, "orphan")
    assert store.closure({child}) == {child, parent}
    assert store.gc({child}, dry_run=True).artifacts == [orphan]
    assert store.exists(orphan)
    assert store.gc({child}, dry_run=False).artifacts == [orphan]
    assert not store.exists(orphan) and store.exists(parent)
    assert store.lineage(child)["inputs"]["parent"]["id"] == parent
