"""What the code runs on: the device, the git checkout, the versions of the packages manifests record."""
from __future__ import annotations

import contextlib
import platform
import subprocess
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


def register_packages(*names: str) -> None:
    """Let a plugin name the distributions its stages depend on (recorded in every manifest)."""
    PACKAGES.extend(n for n in names if n not in PACKAGES)
    package_versions.cache_clear()


@cache
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions
