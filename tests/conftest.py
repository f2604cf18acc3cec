"""Shared fixtures: an isolated artifact root and the toy stage plugin."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stages.plugin  # noqa: F401  (every stage and config section registered in the test process)

REPO = Path(__file__).resolve().parent.parent
TOY_PLUGINS = "stages.plugin,tests.plugin_stages"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh STEGOPIPE_ROOT for the test."""
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("STEGOPIPE_ROOT", str(artifacts))
    return artifacts


@pytest.fixture
def toy(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toy plugin registered in this process and in CLI subprocesses; returns the artifact root."""
    monkeypatch.setenv("STEGOPIPE_PLUGINS", TOY_PLUGINS)
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    import tests.plugin_stages  # noqa: F401
    return root


def cli_process(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start `stegopipe ARGS` as a separate process (inherits the test's environment)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch on one thread for the test and its subprocesses (2 shared cores: more threads only contend)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
