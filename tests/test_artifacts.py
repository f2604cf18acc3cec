"""The content-addressed store: ids, atomic publish, verify, locks, gc."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
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
    store.publish(artifact, staging, {"stage": "toy", "version": "1", "params": {"name": name}, "inputs": inputs or {}})
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


def _fake_owner(path: Path, *, host: str = "elsewhere", pid: int = 4242, since: float = 1.7e9,
                mtime: float | None = None, inputs: list[str] | None = None) -> None:
    """A lock file as another process would have left it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "since": since, "info": {"inputs": inputs or []}}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_waiting_for_a_lock_says_who_holds_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "a.lock"
    _fake_owner(path)
    lock = Lock(path, report_every_s=0.15)
    with caplog.at_level(logging.WARNING, logger="stegopipe"):
        with pytest.raises(ArtifactError, match="pid 4242 on host elsewhere since 2023-11-14") as info:
            lock.acquire(timeout_s=1.0, poll_s=0.02)
    assert "delete the lock file" in str(info.value)
    reports = [r.getMessage() for r in caplog.records if "waiting for lock" in r.getMessage()]
    assert 2 <= len(reports) <= 8  # at once, then every report_every_s; not at every poll (~50)
    assert all(re.search(r"pid 4242 on host elsewhere since .*, heartbeat \d+s ago", r) for r in reports)


def test_a_heartbeat_dated_in_the_future_goes_stale_by_our_clock(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "a.lock"
    _fake_owner(path, mtime=time.time() + 3600)
    lock = Lock(path, stale_after_s=0.4, report_every_s=60)
    assert "in the future" in lock.describe()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="stegopipe"):
        lock.acquire(timeout_s=10, poll_s=0.05)
    try:
        assert 0.4 <= time.monotonic() - start < 5
        assert lock.owner()["pid"] == os.getpid()
        assert any("breaking stale lock" in r.getMessage() for r in caplog.records)
    finally:
        lock.release()
    # a heartbeat that keeps moving is not stale, wherever its clock is
    _fake_owner(path, mtime=time.time() + 3600)
    waiter = Lock(path, stale_after_s=0.3)
    for step in range(8):
        os.utime(path, (time.time() + 3600 + step, time.time() + 3600 + step))
        assert not waiter.try_acquire()
        time.sleep(0.05)


def test_a_late_breaker_never_deletes_a_lock_just_taken(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    _fake_owner(path, mtime=time.time() - 3600)
    late = Lock(path)
    judged = late._judge()  # the late waiter judges the old lock stale ...
    assert judged is not None
    first = Lock(path)
    assert first.try_acquire()  # ... meanwhile another waiter breaks it and takes the lock
    try:
        assert not late._break(judged)  # the late waiter's break is a no-op
        assert path.exists() and first._is_mine()
        assert not late.try_acquire()
    finally:
        first.release()
    assert not path.exists()


def test_concurrent_breakers_let_one_holder_in_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.lock"
    _fake_owner(path, mtime=time.time() - 3600)
    judge = Lock._judge

    def slow_judge(self: Lock) -> os.stat_result | None:
        verdict = judge(self)  # waiter k breaks 40k ms after judging: after an earlier waiter took the lock
        time.sleep(0.04 * int(threading.current_thread().name))
        return verdict

    monkeypatch.setattr(Lock, "_judge", slow_judge)
    holders, peak, guard = [0], [0], threading.Lock()

    def worker() -> None:
        lock = Lock(path, heartbeat_s=0.02)
        lock.acquire(timeout_s=20, poll_s=0.01)
        with guard:
            holders[0] += 1
            peak[0] = max(peak[0], holders[0])
        time.sleep(0.15)
        with guard:
            holders[0] -= 1
        lock.release()

    threads = [threading.Thread(target=worker, name=str(k)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 1
    assert not path.exists() and not path.with_name("a.lock.break").exists()


def test_gc_killed_midway_never_leaves_a_published_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path)
    orphan = _publish(store, "orphan")
    rmtree = shutil.rmtree

    def killed_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        victim = next(p for p in sorted(Path(path).rglob("*")) if p.is_file() and p.name != "manifest.json")
        victim.unlink()  # some files are gone ...
        raise KeyboardInterrupt  # ... when gc is killed

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        store.gc(set(), dry_run=False)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert not store.exists(orphan) and store.ids() == []
    assert not list(tmp_path.glob("toy/*/manifest.json"))
    report = store.gc(set(), dry_run=True)
    assert report.artifacts == [] and report.trash_bytes > 0
    report = store.gc(set(), dry_run=False)  # the next gc finishes the job
    assert report.trash_bytes > 0 and not list((tmp_path / ".trash").iterdir())


def test_gc_keeps_what_a_running_stage_reads_or_writes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    parent = _publish(store, "parent")
    other = _publish(store, "other")
    child = artifact_id("toy", "1", {"name": "child"}, {"parent": parent})
    running = store.lock(child, info={"inputs": [parent]})
    assert running.try_acquire()
    try:
        assert json.loads(running.path.read_text())["info"] == {"inputs": [parent]}
        report = store.gc(set(), dry_run=False)
        assert report.artifacts == [other] and report.in_use == {parent: child}
        assert store.exists(parent) and not store.exists(other)
    finally:
        running.release()
    # a dead run protects nothing
    _fake_owner(store.root / ".locks" / f"{child}.lock", host=os.uname().nodename, pid=2**22 + 12345,
                inputs=[parent])
    assert store.gc(set(), dry_run=False).artifacts == [parent]


def test_gc_cleans_stale_staging_and_reports_bytes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ids = [artifact_id("toy", "1", {"name": n}, {}) for n in ("live", "dead", "orphaned")]
    for k, artifact in enumerate(ids):
        staging = store.staging(artifact, fresh=True)
        (staging.dir / "part.bin").write_bytes(b"x" * 1000 * (k + 1))
    live = store.lock(ids[0])
    assert live.try_acquire()
    _fake_owner(store.lock(ids[1]).path, host=os.uname().nodename, pid=2**22 + 12345)  # a killed run
    try:
        dry = store.gc(set(), dry_run=True)
        assert dry.staging == sorted(ids[1:]) and dry.bytes == 5000
        assert all((tmp_path / ".staging" / a).is_dir() for a in ids)
        done = store.gc(set(), dry_run=False)
        assert done.staging == sorted(ids[1:]) and done.bytes == 5000
        assert sorted(p.name for p in (tmp_path / ".staging").iterdir()) == [ids[0]]
        assert not store.lock(ids[1]).path.exists()  # the dead run's lock went with it
    finally:
        live.release()


def test_a_root_that_cannot_be_written_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    store = ArtifactStore(tmp_path / "file" / "artifacts")
    with pytest.raises(ArtifactError, match=f"artifact root {store.root} is not writable: .*Not a directory"):
        store.require_writable()
    with pytest.raises(ArtifactError, match="not writable"):
        store.gc(set(), dry_run=False)
    assert store.gc(set(), dry_run=True).artifacts == []  # a dry run only reads


def test_lock_without_hard_links_falls_back_to_o_excl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first, second = Lock(tmp_path / "a.lock", info={"inputs": ["x"]}), Lock(tmp_path / "a.lock")
    assert first.try_acquire() and not second.try_acquire()
    assert first.owner()["info"] == {"inputs": ["x"]} and [p.name for p in tmp_path.iterdir()] == ["a.lock"]
    first.release()
    assert second.try_acquire()
    second.release()


def test_a_lock_held_by_a_zombie_is_broken_at_once(tmp_path: Path) -> None:
    """A holder that exited but was not reaped by its parent (a zombie) holds nothing: ``kill(pid, 0)``
    still succeeds on it, so only the process state tells; waiting for the heartbeat would cost minutes."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][:1] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.02)
        (tmp_path / "z.lock").write_text(json.dumps({"pid": child.pid, "host": os.uname().nodename}))
        lock = Lock(tmp_path / "z.lock", stale_after_s=3600)
        assert lock.is_stale()
        lock.acquire(timeout_s=2)
        lock.release()
    finally:
        child.wait()


def test_cached_file_hash_follows_an_edit_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    """A weights or checkpoint file rewritten in place with its size and mtime put back (``touch -d``) must be
    hashed again: keyed by size and mtime alone, the cache named the old bytes."""
    from pipeline.artifacts import sha256_file, sha256_file_cached

    path = tmp_path / "weights.pth"
    path.write_bytes(b"a" * 4096)
    before = path.stat()
    first = sha256_file_cached(path)
    assert first == sha256_file(path) and sha256_file_cached(path) == first
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert sha256_file_cached(path) == sha256_file(path) != first
