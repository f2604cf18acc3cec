"""Code fingerprints: which source a stage's output depends on, hashed so that only code counts.

The fingerprint of a module is the set of project modules it reaches, found statically from the source
(never by importing): every ``import``/``from ... import`` anywhere in a file (inside functions too,
relative ones resolved), and every string constant that names a project module (``lazy_module("...")``,
``importlib.import_module("...")``, a method declared by module name). Importing ``a.b.c`` runs the
``__init__`` of ``a`` and ``a.b``, so those count too. A *project* module is one of the packages
``pipeline`` and ``stages`` or of a plugin module's top-level package (``STEGOPIPE_PLUGINS``).

Each file is hashed as its AST with docstrings removed and no positions (``ast.dump`` without
attributes), so comments, docstrings and formatting never change a fingerprint; every top-level
function, class and assignment gets a hash of its own, so a change can be named down to the function.
Files are parsed once per ``(path, sha256 of the bytes)`` in this process and cached on disk
(``$STEGOPIPE_CACHE_DIR``, default ``~/.cache/stegopipe``) across processes.

Framework modules that cannot change what a stage writes are left out through :data:`EXCLUDED` only
(one reviewed list, a reason per entry); their imports are not followed through them.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

from pipeline.errors import StageError

SCHEME = 1
"""Version of the fingerprint rules themselves (normalisation, what a file's hash covers)."""

PROJECT_PACKAGES: tuple[str, ...] = ("pipeline", "stages")

EXCLUDED: dict[str, str] = {
    "pipeline.cli": "the command line: parses arguments and prints; a stage never calls it",
    "pipeline.errors": "exception classes and message helpers: an error publishes nothing",
    "pipeline.faults": "fault injection for the crash tests: inert unless STEGOPIPE_FAULT_KILL_AT is set",
    "pipeline.cluster": "Dask clients: where a task or shard runs, not what it computes",
    "pipeline.environment": "device choice and provenance records (git sha, package versions); "
                            "the device is a runtime setting, package versions are flagged by `plan`",
    "pipeline.fingerprint": "computes the fingerprint itself; its SCHEME enters every id",
    "pipeline.lazy": "imports a module on first use: when, not what",
    "pipeline.registry": "stage declarations: the params they yield enter the id as values",
    "pipeline.planner": "turns requests into ids: what it computes is the id itself",
    "pipeline.why": "explains rebuilds in `plan`; reads manifests only",
    "stages.plugin": "registers every stage, command and preset folder; each stage's own modules are "
                     "covered by that stage's fingerprint",
    "stages.labels": "display labels of results (ls/plan/report columns), not results",
}


@dataclass(frozen=True)
class FileFacts:
    """What one source file contributes: its normalised hash, a hash per top-level name, the module
    names it mentions (imports and module-like strings; resolved against the project later)."""

    digest: str
    defs: dict[str, str]
    mentions: tuple[str, ...]


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _top_level_name(node: ast.stmt) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if names:
        return ",".join(names)
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "(imports)"
    return "(module code)"


def _mentions(tree: ast.Module, module: str, is_package: bool) -> tuple[str, ...]:
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.append(source)
            found += [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value.replace(".", "").replace("_", "").isalnum():
            found.append(node.value)
    return tuple(dict.fromkeys(found))


def parse_source(source: bytes, path: Path, module: str) -> FileFacts:
    """The :class:`FileFacts` of one file's ``source`` (uncached; see :func:`file_facts`)."""
    tree = ast.parse(source, filename=str(path))
    _strip_docstrings(tree)
    mentions = _mentions(tree, module, path.name == "__init__.py")
    parts: dict[str, list[str]] = {}
    for node in tree.body:
        parts.setdefault(_top_level_name(node), []).append(ast.dump(node, include_attributes=False))
    defs = {name: _digest("\n".join(dumps))[:16] for name, dumps in parts.items()}
    return FileFacts(_digest(ast.dump(tree, include_attributes=False)), defs, mentions)


class _FileCache:
    """Parsed files by absolute path, valid while the file's bytes hash the same (a sha256 of a source file
    costs microseconds; its size and mtime could hold across an edit); loaded from and saved to one JSON file
    per Python version (the AST differs between versions)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, FileFacts]] = {}
        self.loaded = False
        self.dirty = False

    def path(self) -> Path:
        base = os.environ.get("STEGOPIPE_CACHE_DIR") or Path.home() / ".cache" / "stegopipe"
        return Path(base) / f"fingerprints-s{SCHEME}-py{sys.version_info[0]}{sys.version_info[1]}.json"

    def load(self) -> None:
        self.loaded = True
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            raw = json.loads(self.path().read_text())
            for name, (key, digest, defs, mentions) in raw.items():
                self.entries.setdefault(name, (key, FileFacts(digest, defs, tuple(mentions))))

    def save(self) -> None:
        """Write the cache if it changed (best effort: an unwritable cache only costs time)."""
        if not self.dirty:
            return
        self.dirty = False
        path = self.path()
        raw = {name: [key, f.digest, f.defs, list(f.mentions)] for name, (key, f) in self.entries.items()}
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fingerprints-")
            with os.fdopen(fd, "w") as handle:
                json.dump(raw, handle)
            os.replace(tmp, path)

    def facts(self, path: Path, module: str) -> FileFacts:
        if not self.loaded:
            self.load()
        source = path.read_bytes()
        key = hashlib.sha256(source).hexdigest()
        name = str(path)
        held = self.entries.get(name)
        if held is None or held[0] != key:
            held = self.entries[name] = (key, parse_source(source, path, module))
            self.dirty = True
        return held[1]


_CACHE = _FileCache()


def file_facts(path: Path, module: str) -> FileFacts:
    """The facts of ``path`` (module ``module``), cached by the hash of its bytes."""
    return _CACHE.facts(path, module)


def plugin_modules() -> list[str]:
    """The modules ``STEGOPIPE_PLUGINS`` names (comma list; default ``stages.plugin``)."""
    return [p for p in os.environ.get("STEGOPIPE_PLUGINS", "stages.plugin").split(",") if p]


@cache
def _top_locations(top: str) -> tuple[Path, ...]:
    """Where top-level package (or module) ``top`` lives, found without importing it: on ``sys.path``, else
    through the other finders (an editable install's, which the ``stegopipe`` console script relies on: its
    ``sys.path`` does not hold the checkout)."""
    spec = PathFinder.find_spec(top) or importlib.util.find_spec(top)
    if spec is None:
        return ()
    if spec.submodule_search_locations:
        return tuple(Path(p) for p in spec.submodule_search_locations)
    return (Path(spec.origin),) if spec.origin else ()


@cache
def module_file(name: str) -> tuple[Path, Path] | None:
    """``(file, root)`` of module ``name`` (``root`` holds its top-level package), or None when it is
    no module (a function or class named in an import) or not found (looked up once per process)."""
    top, *rest = name.split(".")
    for location in _top_locations(top):
        if location.suffix == ".py":
            return (location, location.parent) if not rest else None
        base = location.joinpath(*rest)
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate, location.parent
    return None


@dataclass(frozen=True)
class Fingerprint:
    """A stage's code fingerprint: ``digest`` over the normalised hashes of ``files`` (relative path →
    file hash and per-name hashes)."""

    digest: str
    files: dict[str, dict[str, Any]]

    def hashes(self) -> dict[str, str]:
        """File → hash, the short form tasks carry to Dask workers (:func:`changed_code` reads it too)."""
        return {rel: entry["sha256"] for rel, entry in self.files.items()}

    def record(self) -> dict[str, Any]:
        """The manifest form."""
        return {"scheme": SCHEME, "digest": self.digest, "files": self.files}


def closure(roots: Iterable[str], projects: Iterable[str]) -> dict[str, tuple[Path, Path, FileFacts]]:
    """Every project module reachable from ``roots`` (module name → (file, root, its facts)), minus
    :data:`EXCLUDED`."""
    tops = set(projects)
    found: dict[str, tuple[Path, Path, FileFacts]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found or name in EXCLUDED or name.split(".")[0] not in tops:
            continue
        located = module_file(name)
        if located is None:
            continue
        facts = file_facts(located[0], name)
        found[name] = (*located, facts)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += [m for m in facts.mentions if m.split(".")[0] in tops]
    return found


def fingerprint(module: str, plugins: Iterable[str] | None = None) -> Fingerprint:
    """The code fingerprint of ``module`` (a stage's module): its closure plus each plugin module's."""
    plugins = list(plugin_modules() if plugins is None else plugins)
    projects = set(PROJECT_PACKAGES) | {p.split(".")[0] for p in plugins}
    if module_file(module) is None:  # never an empty fingerprint that no code edit could change
        raise StageError(f"cannot fingerprint module {module}: its source file is not found "
                         f"(sys.path: {os.pathsep.join(sys.path)})")
    files: dict[str, dict[str, Any]] = {}
    for path, root, facts in closure([module, *plugins], projects).values():
        files[path.relative_to(root).as_posix()] = {"sha256": facts.digest, "defs": facts.defs}
    _CACHE.save()
    payload = json.dumps([SCHEME, sorted((rel, entry["sha256"]) for rel, entry in files.items())])
    return Fingerprint(_digest(payload)[:32], dict(sorted(files.items())))


def changed_code(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints' files (file → ``{"sha256", "defs"}`` as manifests record
    them, or file → hash as tasks carry them): ``path (name, ...)`` per changed file, naming the top-level
    functions, classes and assignments that changed where both sides have them; ``path (added)`` /
    ``path (removed)`` for files that came or went."""
    def digest(entry: Any) -> Any:
        return entry.get("sha256") if isinstance(entry, Mapping) else entry

    def defs(entry: Any) -> Mapping[str, str]:
        return (entry.get("defs") or {}) if isinstance(entry, Mapping) else {}

    lines = []
    for rel in sorted(set(before) | set(after)):
        if rel not in before:
            lines.append(f"{rel} (added)")
        elif rel not in after:
            lines.append(f"{rel} (removed)")
        elif digest(before[rel]) != digest(after[rel]):
            a, b = defs(before[rel]), defs(after[rel])
            names = [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)] if a and b else []
            lines.append(f"{rel} ({', '.join(names)})" if names else rel)
    return lines
