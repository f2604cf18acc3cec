"""Content-addressed artifact store.

Layout under the root (``STEGOPIPE_ROOT``, default ``./artifacts``)::

    <root>/<stage>/<id>/            a published artifact; ``manifest.json`` inside is its commit record
    <root>/.staging/<id>/           work in progress (resumable stages keep shard markers here)
    <root>/.locks/<id>.lock         one writer per artifact id (see :class:`Lock`)
    <root>/.trash/                  folders on their way out (gc and ``--force`` move them here in one rename)
    <root>/.pins                    ids pinned by hand (``stegopipe pin``), one a line: gc keeps them and their inputs

Contracts:
- ``artifact_id`` is ``<stage>-<first 16 hex of sha256>`` over canonical JSON of stage name, the stage's
  code (its code fingerprint and format version), output-affecting params and the ids of the input
  artifacts.
- A folder without ``manifest.json`` is not an artifact. Publishing writes the manifest last inside the
  staging folder and then renames the folder into place (one atomic rename), so readers never see half
  a result. The manifest carries ``manifest_sha256``, a checksum of its own other fields, so ``verify``
  detects a damaged manifest as well as damaged files.
- Every manifest read is checked (:func:`read_manifest`): sealed, its id the folder's name, its inputs ids,
  its file entries plain relative paths; files are opened only through :func:`confined` (no symlink out of
  the folder). ``verify`` also recomputes the id from what the manifest records (:func:`id_from_manifest`).
- Locks are exclusively created files holding owner pid/host and the ids a running stage reads; the
  owner refreshes the file's mtime every few seconds, so a lock whose mtime is older than
  ``stale_after_s`` (or whose owner pid is dead on this host) is stale and may be broken. This works on
  shared filesystems. gc never deletes what a live lock holds or reads.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import ArtifactError, MissingArtifactError
from pipeline.paths import local_path

_log = logging.getLogger("stegopipe")

MANIFEST = "manifest.json"
PINS = ".pins"
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


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` fit for strict JSON: NaN and ±inf become None, numpy scalars and arrays Python
    values, tuples lists. The one conversion every stage uses before writing JSON."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ArtifactError(f"non-finite number {obj} cannot be hashed")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def artifact_id(stage: str, code: Any, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The content address of a stage run: same stage, code, params and input ids ⇒ same id.

    ``code`` is the stage's code part (:func:`pipeline.registry.stage_code`: its code fingerprint and
    format version, and package versions when asked for); tests and artifacts published before code
    fingerprints pass a plain version string. It enters the hash under the key ``version``."""
    payload = canonical_json({"stage": stage, "version": code, "params": params, "inputs": dict(inputs)})
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def id_from_manifest(manifest: Mapping[str, Any]) -> str:
    """The id :func:`artifact_id` gives for what a manifest records (stage, ``version`` = the code part,
    params, inputs): a manifest whose fields were edited (and its checksum recomputed) no longer matches
    its folder's id. Keep in step with how the planner calls :func:`artifact_id`."""
    return artifact_id(str(manifest.get("stage")), manifest.get("version"), manifest.get("params") or {},
                       manifest.get("inputs") or {})


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


def sha256_file_cached(path: Path) -> str:
    """:func:`sha256_file` of ``path``, remembered in this process while the file keeps its device, inode,
    size, mtime and ctime. An edit that restores size and mtime (``touch -d``, ``os.utime``) still moves
    the ctime, which no user call can set back, so a changed file is always hashed again."""
    stat = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                                                  stat.st_ctime_ns))


@lru_cache(maxsize=64)
def _sha256_of(path: str, identity: tuple[int, ...]) -> str:
    return sha256_file(Path(path))


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


MAX_MANIFEST_BYTES = 256 << 20
"""A manifest larger than this is refused unread (a real one lists at most a few 100k files)."""


def seal_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` with its ``manifest_sha256`` set (what :meth:`ArtifactStore.publish` writes)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return {**body, MANIFEST_CHECKSUM: manifest_checksum(body)}


def confined(directory: Path, rel: Any, *, follow: bool = True) -> Path:
    """``directory / rel`` when ``rel`` is a relative path that stays inside ``directory`` (no absolute
    path, no ``..``, and with ``follow`` no symlink leading out); ArtifactError naming both otherwise."""
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if pure is None or not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"{directory}: file entry {rel!r} is not a plain relative path inside the artifact")
    path = directory / pure
    if not follow:
        return path
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ArtifactError(f"{path}: cannot be resolved ({exc})") from None
    if not inside:
        raise ArtifactError(f"{path}: a symlink leading out of the artifact folder {directory}")
    return path


LOCAL_HINT = "the artifact is damaged and cannot be trusted (rebuild it with --force, or delete its folder)"
"""What to do about a damaged manifest in an artifact root (the ``hint`` of :func:`parse_manifest`)."""


def parse_manifest(data: bytes, where: str, *, directory: Path | None, sealed: bool = True,
                   hint: str = LOCAL_HINT) -> dict[str, Any]:
    """The manifest in ``data``, the bytes of the file ``where``, exactly as it was published, or
    ArtifactError naming ``where``, the first problem and ``hint``. Checked: at most MAX_MANIFEST_BYTES,
    strict JSON (no NaN or Infinity), sealed by its own checksum (skipped when not ``sealed``), its id the
    name of the artifact folder it sits in (``directory``), or, where there is none (an object store),
    present and the one its own stage, version, params and inputs give; ``inputs`` map names to ids,
    ``files`` are ``{path, size >= 0, sha256}`` entries inside the artifact."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{where}: {what}; {hint}")

    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"manifest is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(manifest, dict):
        raise bad(f"manifest is a {type(manifest).__name__}, not a JSON object")
    stored = manifest.get(MANIFEST_CHECKSUM)
    if sealed and not isinstance(stored, str):
        raise bad(f"manifest has no {MANIFEST_CHECKSUM}")
    if sealed and stored != manifest_checksum(manifest):
        raise bad(f"content differs from its {MANIFEST_CHECKSUM} (corrupted or edited)")
    if directory is not None and "id" in manifest and manifest["id"] != directory.name:
        raise bad(f"manifest id {manifest['id']!r} differs from its folder name {directory.name!r}")
    inputs = manifest.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(k, str) and isinstance(v, str) and ID_PATTERN.match(v)
                                               for k, v in inputs.items()):
        raise bad(f"'inputs' must map names to artifact ids, got {json.dumps(inputs, default=str)[:200]}")
    files = manifest.get("files", [])
    if not isinstance(files, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and type(e.get("size")) is int
            and e["size"] >= 0 and isinstance(e.get("sha256"), str) for e in files):
        raise bad("'files' must be a list of {path, size, sha256} entries")
    if directory is None:
        artifact = manifest.get("id")
        if not isinstance(artifact, str) or not ID_PATTERN.match(artifact):
            raise bad(f"manifest id {artifact!r} is not an artifact id")
        if id_from_manifest(manifest) != artifact:
            raise bad(f"its stage, version, params and inputs give the id {id_from_manifest(manifest)}, "
                      f"not {artifact} (the manifest was edited)")
    for entry in files:
        confined(directory or Path(manifest["id"]), entry["path"], follow=False)
    return manifest


def read_manifest(directory: Path, *, sealed: bool = True) -> dict[str, Any]:
    """The manifest of the artifact folder ``directory``, checked (:func:`parse_manifest`): exactly what
    was published, or ArtifactError naming the file (MissingArtifactError when there is none).
    ``sealed=False`` skips only the checksum (the cache check's look at file sizes: a damaged checksum is
    then reported by the input check, which refuses to run, rather than rebuilt over)."""
    path = directory / MANIFEST
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
            data = handle.read(size + 1)  # never more than its size allows (read(n) allocates n bytes)
            if len(data) > size:
                raise ArtifactError(f"{path}: grew while it was read; run again")
    except (FileNotFoundError, NotADirectoryError):
        raise MissingArtifactError(f"artifact {directory.name} does not exist under "
                                   f"{directory.parent.parent}") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({exc.strerror or exc})") from None
    return parse_manifest(data, str(path), directory=directory, sealed=sealed)


def manifest_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the files a (checked) manifest lists."""
    return sum(int(entry["size"]) for entry in manifest.get("files", []))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def ids_mentioned(path: Path) -> set[str]:
    """Every artifact id that appears in the (possibly damaged) file ``path``: what an unreadable manifest
    may depend on, so gc keeps them."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return set()
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return set()
    return set(re.findall(r"[a-z][a-z0-9_-]*-[0-9a-f]{16}(?![0-9a-f])", text))


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


BREAK_HINT = ("if that process is gone (check on its host), delete the lock file; a stale lock is also "
              "broken by itself (README, section Locks)")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is running: a zombie (exited, not yet reaped by its parent)
    holds nothing, so it counts as dead (``os.kill(pid, 0)`` alone succeeds on a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS) or the process just went away: trust kill(0)
        return True
    return stat[stat.rfind(")") + 2:][:1] != "Z"


class Lock:
    """An exclusive, heartbeated lock file (see module docstring).

    The file holds JSON: owner ``pid``, ``host``, ``since`` (epoch seconds) and ``info`` (what the owner
    declared, e.g. the ids of the artifacts a running stage reads, which gc protects). It appears with its
    content in one step (a hard link of a written temporary file; ``O_EXCL`` where links are not supported).
    Stale when the owner's pid is dead on this host, when its heartbeat is older than ``stale_after_s``, or
    when its heartbeat has not moved for ``stale_after_s`` by this process's own clock; the last rule is
    what breaks a heartbeat dated in the future by a host whose clock is ahead (the waiting message calls a
    heartbeat more than ``clock_skew_s`` ahead suspect). Breaking is atomic: one breaker at a time (an
    ``O_EXCL`` ``<name>.break`` guard) removes the file only if it is still the very file
    (inode and mtime) judged stale, so a lock another waiter has just taken is never deleted.
    """

    def __init__(self, path: Path, *, stale_after_s: float = 60.0, heartbeat_s: float = 5.0,
                 report_every_s: float = 30.0, clock_skew_s: float = 5.0, info: Mapping[str, Any] | None = None):
        self.path = path
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.report_every_s = report_every_s
        self.clock_skew_s = clock_skew_s
        self.info = dict(info or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ino: int | None = None  # inode of the lock file this object created
        self._seen: dict[tuple[int, int], float] = {}  # (inode, mtime_ns) -> monotonic time first seen

    def owner(self) -> dict[str, Any]:
        """The lock file's JSON ({} when absent or unreadable)."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _judge(self) -> os.stat_result | None:
        """The lock file's stat when it is stale, else None (also when there is no lock file)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        owner = self.owner()
        if (owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
                and not _pid_alive(owner["pid"])):
            return st
        if time.time() - st.st_mtime > self.stale_after_s:
            return st
        first_seen = self._seen.setdefault((st.st_ino, st.st_mtime_ns), time.monotonic())
        return st if time.monotonic() - first_seen > self.stale_after_s else None

    def is_stale(self) -> bool:
        return self._judge() is not None

    def describe(self) -> str:
        """Who holds the lock and since when, for messages."""
        owner = self.owner()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "free"
        try:
            since_text = _dt.datetime.fromtimestamp(owner["since"], _dt.timezone.utc).isoformat(timespec="seconds")
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            since_text = "an unknown time"
        if age < -self.clock_skew_s:
            beat = (f"heartbeat dated {-age:.0f}s in the future (clock skew?), treated as stale if it does not "
                    f"move for {self.stale_after_s:.0f}s")
        else:
            beat = f"heartbeat {max(age, 0):.0f}s ago"
        return (f"held by pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {since_text}, {beat}")

    def _create(self) -> bool:
        """Create the lock file, whole, if absent (link of a written temporary file: atomic, O_EXCL-like)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                              "info": self.info}, default=_json_default)
        tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(content)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(content)
        finally:
            tmp.unlink()
        self._ino = os.stat(self.path).st_ino
        return True

    def _break(self, judged: os.stat_result) -> bool:
        """Remove the lock file judged stale (``judged``: its stat then) unless it has changed since.

        True when the lock file is gone afterwards. One breaker at a time: the ``.break`` guard; a guard
        left behind by a breaker that died is removed once older than ``stale_after_s``.
        """
        guard = self.path.with_name(self.path.name + ".break")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if abs(time.time() - guard.stat().st_mtime) > self.stale_after_s:
                    guard.unlink()
            return False
        try:
            current = os.stat(self.path)
            if (current.st_ino, current.st_mtime_ns) != (judged.st_ino, judged.st_mtime_ns):
                return False  # another waiter broke it and took it meanwhile
            _log.warning("breaking stale lock %s (%s)", self.path, self.describe())
            self.path.unlink()
            return True
        except FileNotFoundError:
            return True
        finally:
            guard.unlink(missing_ok=True)

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale (broken atomically first); False while someone holds it."""
        if not self._create():
            judged = self._judge()
            if judged is None or not self._break(judged) or not self._create():
                return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return True

    def _is_mine(self) -> bool:
        try:
            return self._ino is not None and os.stat(self.path).st_ino == self._ino
        except FileNotFoundError:
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._is_mine():
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.path)

    def acquire(self, *, timeout_s: float | None = None, poll_s: float = 0.2) -> None:
        """Wait for the lock; say who holds it (once, then every ``report_every_s``); ArtifactError after
        ``timeout_s``."""
        start = time.monotonic()
        next_report = start
        while not self.try_acquire():
            now = time.monotonic()
            if timeout_s is not None and now - start > timeout_s:
                raise ArtifactError(f"timed out after {timeout_s:.0f}s waiting for lock {self.path} "
                                    f"({self.describe()}); {BREAK_HINT}")
            if now >= next_report:
                _log.warning("waiting for lock %s: %s", self.path, self.describe())
                next_report = now + self.report_every_s
            time.sleep(poll_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._is_mine():  # never delete a lock that was broken and taken by someone else
            self.path.unlink(missing_ok=True)
        self._ino = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ArtifactView:
    """A published artifact folder, read-only: its manifest, id params and lineage. A stage kind
    subclasses it to name its files (class attributes its writer uses too) and read them, so no other
    stage reaches into its folder by literal file names."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, store: ArtifactStore, artifact: str) -> Any:
        """The view of published ``artifact`` in ``store`` (MissingArtifactError when it is not there)."""
        view = cls(store.path(artifact))
        view.__dict__["manifest"] = store.manifest(artifact)
        return view

    @property
    def id(self) -> str:
        return self.path.name

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    @property
    def stage(self) -> str | None:
        return self.manifest.get("stage")

    @property
    def params(self) -> dict[str, Any]:
        """The params its id was computed from."""
        return dict(self.manifest.get("params") or {})

    @property
    def lineage(self) -> dict[str, str]:
        """Its input artifacts by name (e.g. ``{"index": "prepare-..."}``)."""
        return dict(self.manifest.get("inputs") or {})

    def input_id(self, name: str) -> str:
        """The id of its input ``name``; ArtifactError naming the artifact when it records none."""
        lineage = self.lineage
        if name not in lineage:
            raise ArtifactError(f"artifact {self.id}: its manifest records no {name!r} input "
                                f"(inputs: {', '.join(lineage) or 'none'})")
        return lineage[name]

    def read_json(self, name: str) -> Any:
        """The JSON file ``name`` of the artifact; ArtifactError naming the file when it is missing or invalid."""
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable ({exc})") from exc


class ArtifactStore:
    """The folder of published artifacts, their staging areas and locks."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(local_path(root, "artifact root (run.root, STEGOPIPE_ROOT)")).expanduser().resolve()

    # -- addressing ---------------------------------------------------------------------------
    def path(self, artifact: str) -> Path:
        return self.root / stage_of(artifact) / artifact

    def exists(self, artifact: str) -> bool:
        return (self.path(artifact) / MANIFEST).is_file()

    def incomplete(self, artifact: str) -> list[str]:
        """Files the manifest lists that are missing or of another size (a cheap check: one stat per
        file, no hashing); empty when the artifact looks whole."""
        directory = self.path(artifact)
        bad = []
        for entry in read_manifest(directory, sealed=False).get("files", []):
            try:
                if confined(directory, entry["path"]).stat().st_size != entry["size"]:
                    bad.append(entry["path"])
            except (OSError, ArtifactError):
                bad.append(entry["path"])
        return bad

    def manifest(self, artifact: str) -> dict[str, Any]:
        """The checked manifest of ``artifact`` (:func:`read_manifest`)."""
        return read_manifest(self.path(artifact))

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

    def size(self, artifact: str) -> int:
        """Bytes of the files an artifact's manifest lists (:func:`manifest_bytes`; reads the manifest)."""
        return manifest_bytes(self.manifest(artifact))

    # -- pins ---------------------------------------------------------------------------------
    def pins(self) -> list[str]:
        """Ids pinned by hand (``<root>/.pins``, one a line; blank lines and ``#`` comments ignored)."""
        try:
            lines = (self.root / PINS).read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

    def set_pinned(self, artifact: str, pinned: bool) -> bool:
        """Pin (or unpin) a published ``artifact``; False when nothing changed. The file is rewritten atomically."""
        current = self.pins()
        if (artifact in current) == pinned:
            return False
        if pinned and not self.exists(artifact):
            raise MissingArtifactError(f"artifact {artifact} does not exist under {self.root}")
        updated = current + [artifact] if pinned else [a for a in current if a != artifact]
        tmp = self.root / f"{PINS}.tmp-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(f"{a}\n" for a in updated))
            os.replace(tmp, self.root / PINS)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ArtifactError(f"cannot write the pin list {self.root / PINS}: {exc.strerror or exc}; "
                                f"pins need a writable artifact root") from None
        return True

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
    def require_writable(self) -> None:
        """ArtifactError, one line naming the root, unless lock files can be created under it."""
        try:
            locks = self.root / ".locks"
            locks.mkdir(parents=True, exist_ok=True)
            probe = locks / f".probe-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ArtifactError(f"artifact root {self.root} is not writable: {exc}; point STEGOPIPE_ROOT "
                                f"(or run.root) at a writable folder") from exc

    def lock(self, artifact: str, **kwargs: Any) -> Lock:
        return Lock(self.root / ".locks" / f"{artifact}.lock", **kwargs)

    def in_use(self) -> dict[str, str]:
        """Artifacts a live lock holds or declares as read (``info["inputs"]``), each mapped to that lock's id."""
        used: dict[str, str] = {}
        locks = self.root / ".locks"
        for path in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
            lock = Lock(path)
            if lock.is_stale() or not path.exists():
                continue
            holder = path.name[: -len(".lock")]
            used[holder] = holder
            inputs = lock.owner().get("info", {}).get("inputs", [])
            used.update({dep: holder for dep in inputs if isinstance(dep, str)})
        return used

    def staging(self, artifact: str, *, fresh: bool) -> Staging:
        """The staging folder of ``artifact``; ``fresh`` wipes earlier partial work (non-resumable stages)."""
        directory = self.root / ".staging" / artifact
        if fresh and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return Staging(directory)

    def publish(self, artifact: str, staging: Staging, manifest: dict[str, Any], *,
                files: list[dict[str, Any]] | None = None) -> Path:
        """Hash the staged files, write the manifest last, move the folder into place atomically.

        An existing artifact of the same id (a ``--force`` re-run) is replaced only after the new one
        is complete. ``files``: the file entries when they are known already (an adopted twin: hard links
        of a published artifact's files), so nothing is hashed again.
        """
        manifest = dict(manifest, id=artifact, files=describe_files(staging.dir) if files is None else files)
        manifest[MANIFEST_CHECKSUM] = manifest_checksum(manifest)
        write_json_atomic(staging.dir / MANIFEST, manifest)  # a failure here keeps the shard markers
        shutil.rmtree(staging.dir / SHARD_MARKERS, ignore_errors=True)
        final = self.path(artifact)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            trash = self._trash(final)
            os.replace(staging.dir, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging.dir, final)
        return final

    # -- checking and housekeeping ------------------------------------------------------------
    def verify(self, artifact: str, *, hash_max_bytes: int | None = None,
               manifest: Mapping[str, Any] | None = None) -> list[str]:
        """Check the manifest's own checksum and re-hash every file against it; returns one problem line
        per bad file (empty: intact). Files larger than ``hash_max_bytes`` (None: no limit) only get
        their size checked. ``manifest``: the artifact's manifest as :meth:`manifest` returned it to the
        caller (not read again)."""
        directory = self.path(artifact)
        if manifest is None:
            try:
                manifest = self.manifest(artifact)
            except ArtifactError as exc:
                return [str(exc)]
        problems = []
        recomputed = id_from_manifest(manifest)
        if recomputed != artifact:
            problems.append(f"{directory / MANIFEST}: its stage, version, params and inputs give the id {recomputed}, "
                            f"not {artifact} (the manifest was edited)")
        listed = {entry["path"] for entry in manifest.get("files", [])}
        for entry in manifest.get("files", []):
            try:
                path = confined(directory, entry["path"])
            except ArtifactError as exc:
                problems.append(str(exc))
                continue
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
        """Nested {id, stage, inputs: {name: lineage}} of an artifact; an input whose manifest cannot be
        read is ``{"id", "unreadable": reason}``, a missing one ``{"id", "missing": True}``."""
        manifest = self.manifest(artifact)
        inputs: dict[str, Any] = {}
        for name, dep in manifest.get("inputs", {}).items():
            try:
                inputs[name] = self.lineage(dep)
            except MissingArtifactError:
                inputs[name] = {"id": dep, "missing": True}
            except ArtifactError as exc:
                inputs[name] = {"id": dep, "unreadable": str(exc)}
        return {"id": artifact, "stage": manifest.get("stage"), "inputs": inputs}

    def closure(self, roots: set[str], *, unreadable: dict[str, str] | None = None) -> set[str]:
        """``roots`` plus every artifact they were built from. A manifest that cannot be read is skipped
        with a warning (its reason goes into ``unreadable`` when given) and every id mentioned in its file
        counts as an input, so gc never deletes what it may have been built from."""
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            artifact = todo.pop()
            if artifact in seen or not ID_PATTERN.match(artifact) or not self.exists(artifact):
                continue
            seen.add(artifact)
            try:
                todo += list(self.manifest(artifact).get("inputs", {}).values())
            except ArtifactError as exc:
                _log.warning("skipping %s: %s", artifact, exc)
                if unreadable is not None:
                    unreadable[artifact] = str(exc)
                todo += sorted(ids_mentioned(self.path(artifact) / MANIFEST))
        return seen

    def _trash(self, directory: Path) -> Path:
        """Move ``directory`` into ``<root>/.trash/`` in one rename (it leaves its place whole) and return
        the new path."""
        trash = self.root / ".trash" / f"{directory.name}-{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(directory, trash)
        return trash

    def gc(self, keep: set[str], *, dry_run: bool = True) -> GcReport:
        """Delete (or with ``dry_run`` only list) published artifacts outside the closure of ``keep`` and of
        the pinned ids (:meth:`pins`), staging folders whose lock is absent or stale, and leftovers in ``.trash``.

        Never deleted: artifacts that a live lock holds or declares as input (a running stage). Deleting
        renames the folder into ``.trash`` first, so a killed gc never leaves a published-looking half;
        the next gc removes what it left in ``.trash``.
        """
        if not dry_run:
            self.require_writable()
        report = GcReport()
        referenced = self.closure(set(keep) | set(self.pins()), unreadable=report.unreadable)
        used = self.in_use()
        for artifact in self.ids():
            if artifact in referenced:
                continue
            try:
                self.manifest(artifact)
            except ArtifactError as exc:  # an unreadable manifest protects its artifact (and what it names)
                report.unreadable[artifact] = str(exc)
                referenced |= self.closure(ids_mentioned(self.path(artifact) / MANIFEST))
        for artifact in self.ids():
            if artifact in referenced or artifact in report.unreadable:
                continue
            if artifact in used:
                report.in_use[artifact] = used[artifact]
                continue
            size = _disk_usage(self.path(artifact))
            if not dry_run:
                trash = self._trash(self.path(artifact))
                if artifact in self.in_use():  # a stage started reading it meanwhile: put it back
                    os.rename(trash, self.path(artifact))
                    report.in_use[artifact] = "a stage that started during gc"
                    continue
                shutil.rmtree(trash, ignore_errors=True)
            report.artifacts.append(artifact)
            report.sizes[artifact] = size
            report.bytes += size
        staging_root = self.root / ".staging"
        for directory in sorted(staging_root.iterdir()) if staging_root.is_dir() else []:
            if not ID_PATTERN.match(directory.name):
                continue
            lock = self.lock(directory.name)
            if dry_run:
                if lock.path.exists() and not lock.is_stale():
                    continue
                size = _disk_usage(directory)
            else:
                if not lock.try_acquire():  # a live run owns it
                    continue
                try:
                    size = _disk_usage(directory)
                    trash = self._trash(directory)
                finally:
                    lock.release()
                shutil.rmtree(trash, ignore_errors=True)
            report.staging.append(directory.name)
            report.bytes += size
        trash_root = self.root / ".trash"
        for leftover in sorted(trash_root.iterdir()) if trash_root.is_dir() else []:
            folder = leftover.is_dir() and not leftover.is_symlink()
            report.trash_bytes += _disk_usage(leftover) if folder else leftover.lstat().st_size
            if not dry_run:
                if folder:
                    shutil.rmtree(leftover, ignore_errors=True)
                else:  # a link or a file: rmtree refuses it, and would leave it to be reported again
                    leftover.unlink(missing_ok=True)
        report.bytes += report.trash_bytes
        return report


@dataclass
class GcReport:
    """What :meth:`ArtifactStore.gc` deleted (or would delete)."""

    artifacts: list[str] = field(default_factory=list)  # unreferenced published artifacts
    sizes: dict[str, int] = field(default_factory=dict)  # bytes on disk of each of them
    staging: list[str] = field(default_factory=list)  # ids of stale staging folders
    in_use: dict[str, str] = field(default_factory=dict)  # unreferenced but kept: id -> the lock using it
    unreadable: dict[str, str] = field(default_factory=dict)  # kept because its manifest cannot be read: id -> why
    trash_bytes: int = 0  # leftovers of an earlier, interrupted gc or publish
    bytes: int = 0  # everything freed (or that would be), trash included


def _disk_usage(directory: Path) -> int:
    """Bytes of the regular files under ``directory`` (0 when it vanished)."""
    total = 0
    for base, _, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, name)).st_size
    return total


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

