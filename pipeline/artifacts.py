"""Content-addressed artifact store.

Layout under the root (``STEGOPIPE_ROOT``, default ``./artifacts``)::

    <root>/<stage>/<id>/            a published artifact; ``manifest.json`` inside is its commit record
    <root>/.staging/<id>/           work in progress (resumable stages keep shard markers here)
    <root>/.locks/<id>.lock         one writer per artifact id

Contracts:
- ``artifact_id`` is ``<stage>-<first 16 hex of sha256>`` over canonical JSON of stage name, stage code
  version, output-affecting params and the ids of the input artifacts.
- A folder without ``manifest.json`` is not an artifact. Publishing writes the manifest last inside the
  staging folder and then renames the folder into place (one atomic rename), so readers never see half
  a result. The manifest carries ``manifest_sha256``, a checksum of its own other fields, so ``verify``
  detects a damaged manifest as well as damaged files.
- Locks are ``O_EXCL`` files holding owner pid/host; the owner refreshes the file's mtime every few
  seconds, so a lock whose mtime is older than ``stale_after_s`` (or whose owner pid is dead on this
  host) is stale and may be broken. This works on shared filesystems.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError, MissingArtifactError

MANIFEST = "manifest.json"
SHARD_MARKERS = ".shards"
ID_PATTERN = re.compile(r"^(?P<stage>[a-z][a-z0-9_-]*)-(?P<hash>[0-9a-f]{16})$")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot put {type(obj).__name__} into an artifact id or manifest: {obj!r}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ArtifactError(f"non-finite number {obj} cannot be hashed")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def artifact_id(stage: str, version: str, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The content address of a stage run: same stage/version/params/input ids ⇒ same id."""
    payload = canonical_json({"stage": stage, "version": version, "params": params, "inputs": dict(inputs)})
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def stage_of(artifact: str) -> str:
    """Stage name of an artifact id; ArtifactError when the id is malformed."""
    match = ID_PATTERN.match(artifact)
    if not match:
        raise ArtifactError(f"'{artifact}' is not an artifact id (expected <stage>-<16 hex digits>)")
    return match["stage"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: the file is whole or absent (no temporary
    file is left behind when writing fails, e.g. on a full disk)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


MANIFEST_CHECKSUM = "manifest_sha256"


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its ``manifest_sha256`` field (as read back from disk)."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM},
                                 default=_json_default))
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def list_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` (relative, sorted), excluding the manifest and shard markers."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.parts[0] not in (MANIFEST, SHARD_MARKERS):
            out.append(rel)
    return out


def describe_files(directory: Path) -> list[dict[str, Any]]:
    return [
        {"path": rel.as_posix(), "size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
        for rel in list_files(directory)
    ]


@dataclass
class Staging:
    """A work folder for one artifact id, with per-shard completion markers for resumable stages."""

    dir: Path

    def shard_done(self, key: str) -> bool:
        return (self.dir / SHARD_MARKERS / f"{key}.done").is_file()

    def mark_shard_done(self, key: str) -> None:
        markers = self.dir / SHARD_MARKERS
        markers.mkdir(parents=True, exist_ok=True)
        (markers / f"{key}.done").write_text(str(time.time()))

    def unmark_shard(self, key: str) -> None:
        """Forget that shard ``key`` is done (before deleting staged data a re-run would need)."""
        (self.dir / SHARD_MARKERS / f"{key}.done").unlink(missing_ok=True)

    def done_shards(self) -> list[str]:
        markers = self.dir / SHARD_MARKERS
        return sorted(p.stem for p in markers.glob("*.done")) if markers.is_dir() else []


class Lock:
    """An exclusive, heartbeated lock file (see module docstring)."""

    def __init__(self, path: Path, *, stale_after_s: float = 60.0, heartbeat_s: float = 5.0):
        self.path = path
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        owner = self._owner()
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return age > self.stale_after_s

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if self.is_stale():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, handle)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def acquire(self, *, timeout_s: float | None = None, poll_s: float = 0.2) -> None:
        start = time.monotonic()
        while not self.try_acquire():
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise ArtifactError(f"timed out after {timeout_s:.0f}s waiting for lock {self.path} ({self._owner()})")
            time.sleep(poll_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ArtifactStore:
    """The folder of published artifacts, their staging areas and locks."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    # -- addressing ---------------------------------------------------------------------------
    def path(self, artifact: str) -> Path:
        return self.root / stage_of(artifact) / artifact

    def exists(self, artifact: str) -> bool:
        return (self.path(artifact) / MANIFEST).is_file()

    def manifest(self, artifact: str) -> dict[str, Any]:
        path = self.path(artifact) / MANIFEST
        if not path.is_file():
            raise MissingArtifactError(f"artifact {artifact} does not exist under {self.root}")
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from exc

    def ids(self, stage: str | None = None) -> list[str]:
        """Published artifact ids, optionally of one stage, sorted by creation time."""
        stages = [self.root / stage] if stage else [p for p in self.root.iterdir() if not p.name.startswith(".")] \
            if self.root.is_dir() else []
        found = []
        for stage_dir in stages:
            if stage_dir.is_dir():
                found += [p for p in stage_dir.iterdir() if (p / MANIFEST).is_file()]
        found.sort(key=lambda p: (p / MANIFEST).stat().st_mtime)
        return [p.name for p in found]

    def resolve(self, prefix: str) -> str:
        """Full id from an id or an unambiguous prefix of one (as git does for commits)."""
        if ID_PATTERN.match(prefix) and self.exists(prefix):
            return prefix
        matches = [a for a in self.ids() if a.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise MissingArtifactError(f"no artifact matches '{prefix}' under {self.root} (see `stegopipe ls`)")
        raise ArtifactError(f"'{prefix}' is ambiguous: {', '.join(matches[:5])}")

    # -- writing ------------------------------------------------------------------------------
    def lock(self, artifact: str, **kwargs: Any) -> Lock:
        return Lock(self.root / ".locks" / f"{artifact}.lock", **kwargs)

    def staging(self, artifact: str, *, fresh: bool) -> Staging:
        """The staging folder of ``artifact``; ``fresh`` wipes earlier partial work (non-resumable stages)."""
        directory = self.root / ".staging" / artifact
        if fresh and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return Staging(directory)

    def publish(self, artifact: str, staging: Staging, manifest: dict[str, Any]) -> Path:
        """Hash the staged files, write the manifest last, move the folder into place atomically.

        An existing artifact of the same id (a ``--force`` re-run) is replaced only after the new one
        is complete.
        """
        manifest = dict(manifest, id=artifact, files=describe_files(staging.dir))
        manifest[MANIFEST_CHECKSUM] = manifest_checksum(manifest)
        write_json_atomic(staging.dir / MANIFEST, manifest)  # a failure here keeps the shard markers
        shutil.rmtree(staging.dir / SHARD_MARKERS, ignore_errors=True)
        final = self.path(artifact)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            trash = self.root / ".trash" / f"{artifact}-{time.time_ns()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, trash)
            os.replace(staging.dir, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging.dir, final)
        return final

    # -- checking and housekeeping ------------------------------------------------------------
    def verify(self, artifact: str, *, hash_max_bytes: int | None = None) -> list[str]:
        """Check the manifest's own checksum and re-hash every file against it; returns one problem line
        per bad file (empty: intact). Files larger than ``hash_max_bytes`` (None: no limit) only get
        their size checked."""
        directory = self.path(artifact)
        try:
            manifest = self.manifest(artifact)
        except ArtifactError as exc:
            return [str(exc)]
        stored = manifest.get(MANIFEST_CHECKSUM)
        if stored is not None and stored != manifest_checksum(manifest):  # its file list cannot be trusted
            return [f"{directory / MANIFEST}: content differs from its manifest_sha256 (corrupted)"]
        problems = []
        listed = {entry["path"] for entry in manifest.get("files", [])}
        for entry in manifest.get("files", []):
            path = directory / entry["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{path}: size {path.stat().st_size} != {entry['size']} in the manifest")
            elif hash_max_bytes is not None and entry["size"] > hash_max_bytes:
                continue
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
        problems += [f"{directory / rel}: not listed in the manifest" for rel in list_files(directory)
                     if rel.as_posix() not in listed]
        return problems

    def lineage(self, artifact: str) -> dict[str, Any]:
        """Nested {id, stage, inputs: {name: lineage}} of an artifact."""
        manifest = self.manifest(artifact)
        return {
            "id": artifact,
            "stage": manifest.get("stage"),
            "inputs": {name: self.lineage(dep) if self.exists(dep) else {"id": dep, "missing": True}
                       for name, dep in manifest.get("inputs", {}).items()},
        }

    def closure(self, roots: set[str]) -> set[str]:
        """``roots`` plus every artifact they were built from."""
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            artifact = todo.pop()
            if artifact in seen or not self.exists(artifact):
                continue
            seen.add(artifact)
            todo += list(self.manifest(artifact).get("inputs", {}).values())
        return seen

    def gc(self, keep: set[str], *, dry_run: bool = True) -> list[str]:
        """Delete (or with ``dry_run`` only list) published artifacts outside the closure of ``keep``."""
        referenced = self.closure(keep)
        doomed = [a for a in self.ids() if a not in referenced]
        if not dry_run:
            for artifact in doomed:
                shutil.rmtree(self.path(artifact))
            shutil.rmtree(self.root / ".trash", ignore_errors=True)
        return doomed


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

