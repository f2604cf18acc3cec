"""CLI smoke: help, run prepare on synthetic data, ls, show, verify, config, gc, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import main


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_everywhere() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0 and "run" in result.output and "verify" in result.output
    for command in ("run", "ls", "show", "verify", "gc", "config", "stages"):
        sub = _invoke(command, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.output, command


def test_run_prepare_ls_show_verify(root: Path) -> None:
    result = _invoke("run", "prepare", "--preset", "synthetic", "dataset.synthetic.n_train=6",
                     "dataset.synthetic.n_val=2")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    index = json.loads((path / "index.json").read_text())
    assert index["split"] == "train" and len(index["samples"]) == 6
    assert path.parent.parent == root

    again = _invoke("run", "prepare", "--preset", "synthetic", "dataset.synthetic.n_train=6",
                    "dataset.synthetic.n_val=2")
    assert "0 built, 2 cached" in again.stderr

    listing = _invoke("ls")
    assert path.name in listing.output and "synthesize-" in listing.output
    shown = _invoke("show", path.name[:14])
    assert shown.exit_code == 0 and '"stage": "prepare"' in shown.output and "synthesize-" in shown.output

    assert _invoke("verify").exit_code == 0
    (path / "index.json").write_text("{}")
    bad = _invoke("verify", path.name)
    assert bad.exit_code == 1 and "index.json" in bad.output and "BAD" in bad.output


def test_errors_are_one_line_with_nonzero_exit(root: Path) -> None:
    result = _invoke("run", "prepare", "dataset.nam=x")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "dataset.name" in result.stderr
    assert "Traceback" not in result.output
    unknown = _invoke("run", "nonsense")
    assert unknown.exit_code == 2 and "neither a stage" in unknown.stderr


def test_config_prints_resolved_yaml() -> None:
    result = _invoke("config", "synthetic", "dataset.synthetic.seed=3")
    assert result.exit_code == 0 and "seed: 3" in result.output and "name: synthetic" in result.output


def test_gc_is_a_dry_run_by_default(root: Path) -> None:
    assert _invoke("run", "synthesize", "dataset.synthetic.n_train=2", "dataset.synthetic.n_val=1").exit_code == 0
    dry = _invoke("gc")
    assert "would delete synthesize-" in dry.output
    assert "cannot be planned here" in dry.stderr  # paper experiments need DINO weights
    assert list((root / "synthesize").iterdir())
    refused = _invoke("gc", "--yes")
    assert refused.exit_code == 2 and "refusing to delete" in refused.stderr
    assert list((root / "synthesize").iterdir())
    assert "deleted synthesize-" in _invoke("gc", "--yes", "--experiment", "demo").output
    assert not any((root / "synthesize").iterdir())
