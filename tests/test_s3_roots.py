"""URL roots are refused in one line (issue 24, item 1): the artifact root and every path setting."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import REPO


def test_url_artifact_root_is_one_error_line_and_creates_nothing(tmp_path: Path) -> None:
    """A new user's command: before, it printed "built ... under s3://bucket/x" and wrote a local `s3:` folder."""
    env = dict(os.environ, STEGOPIPE_ROOT="s3://bucket/x", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "synthesize"], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "s3://bucket/x" in lines[0] and "STEGOPIPE_ROOT" in lines[0]
    assert "local or shared filesystem path" in lines[0] and "stegopipe export-tokens" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no `s3:` folder, nothing else either


@pytest.mark.parametrize("args", [
    ("run", "prepare", "--preset", "folder", "dataset.root=gs://bucket/coco"),
    ("run", "extract", "backbone.weights=dino", "backbone.weights_dir=https://example.org/weights"),
    ("run", "report", "report.out_dir=file:///tmp/reports"),
    ("ls",),
    ("export-nns", "knn-0", "s3://bucket/nns"),
    ("import-stego", "gs://bucket/stego.ckpt"),
    ("predict", "--head", "train-head-0", "--out", "s3://bucket/preds", "image.png"),
    ("predict", "--head", "train-head-0", "https://example.org/image.png"),
])
def test_url_in_any_path_setting_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            args: tuple[str, ...]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STEGOPIPE_ROOT", "s3://bucket/x" if args == ("ls",) else str(tmp_path / "artifacts"))
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code in (1, 2), result.output
    url_lines = [line for line in result.stderr.splitlines() if "is a URL" in line]
    assert len(url_lines) == 1 and "local or shared filesystem path" in url_lines[0], result.stderr
    assert not (tmp_path / "artifacts").exists() and not any(p.name.endswith(":") for p in tmp_path.iterdir())
