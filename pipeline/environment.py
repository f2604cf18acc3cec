"""What the code runs on: the device, the git checkout, the versions of the packages manifests record."""
from __future__ import annotations

import contextlib
import platform
import subprocess
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


@cache
def code_version() -> dict[str, Any]:
    """git sha and dirty flag of the checkout the code runs from (``unknown`` outside git)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "dirty": None}
    return {"git_sha": sha, "dirty": dirty}


PACKAGES: list[str] = ["omegaconf", "dask", "distributed"]
"""Distributions whose versions every manifest records: the framework's, then those plugins add."""
NUMERIC_PACKAGES: list[str] = []
"""Of those, the ones whose versions decide numerics: ``plan`` flags a cached artifact built under other
versions of them, and ``run.id_includes_packages=true`` puts their versions into every id."""


def register_packages(*names: str, numerics: Iterable[str] = ()) -> None:
    """Let a plugin name the distributions its stages depend on (recorded in every manifest), and which of
    them decide numerics."""
    numerics = list(numerics)
    PACKAGES.extend(n for n in [*names, *numerics] if n not in PACKAGES)
    NUMERIC_PACKAGES.extend(n for n in numerics if n not in NUMERIC_PACKAGES)
    package_versions.cache_clear()


@cache
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def numeric_package_versions() -> dict[str, str]:
    """The installed versions of :data:`NUMERIC_PACKAGES` (and Python)."""
    versions = package_versions()
    return {name: versions[name] for name in ["python", *NUMERIC_PACKAGES] if name in versions}


def package_drift(recorded: Mapping[str, Any]) -> list[str]:
    """``name old → new`` for each numerics package whose version in ``recorded`` (a manifest's
    ``packages``) differs from the installed one."""
    now = numeric_package_versions()
    return [f"{name} {recorded[name]} → {now.get(name, 'not installed')}"
            for name in now if name in recorded and recorded[name] != now.get(name)]
