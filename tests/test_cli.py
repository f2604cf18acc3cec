"""CLI smoke: help, run prepare on synthetic data, ls, show, verify, config, gc, one-line errors, stop signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
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
    assert shown.exit_code == 0 and "stage      prepare (index)" in shown.output and "synthesize-" in shown.output
    assert "split=train" in shown.output and "status     published" in shown.output and '"files"' not in shown.output
    full = json.loads(_invoke("show", path.name, "--json").output)
    assert full["stage"] == "prepare" and {f["path"] for f in full["files"]} == {"index.json", "log.txt"}
    assert "[run] " + path.name in (path / "log.txt").read_text()  # the stage's log lines, kept with it

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


def test_gc_reports_stale_staging_and_bytes(root: Path) -> None:
    stale = root / ".staging" / "synthesize-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "part.bin").write_bytes(b"x" * 300_000)  # a failed run's leftovers, no lock
    dry = _invoke("gc", "--experiment", "demo")
    assert dry.exit_code == 0 and "would delete staging folder synthesize-0123456789abcdef" in dry.output
    assert "1 stale staging folders, 0.3 MB to free (dry run" in dry.stderr and stale.is_dir()
    done = _invoke("gc", "--yes", "--experiment", "demo")
    assert "deleted staging folder synthesize-0123456789abcdef" in done.output and "0.3 MB freed" in done.stderr
    assert not stale.exists()


def _one_error_line(result: object, root: Path) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output  # type: ignore[attr-defined]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # type: ignore[attr-defined]
    assert len(errors) == 1 and f"artifact root {root} is not writable" in errors[0], result.stderr  # type: ignore


def test_an_unwritable_root_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    root = tmp_path / "file" / "artifacts"  # its parent is a regular file: ENOTDIR, even for root
    monkeypatch.setenv("STEGOPIPE_ROOT", str(root))
    _one_error_line(_invoke("run", "synthesize", "dataset.synthetic.n_train=2", "dataset.synthetic.n_val=1"), root)
    _one_error_line(_invoke("gc", "--yes", "--experiment", "demo"), root)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at a fresh folder (remount it read-only in the test); skips where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_root_is_one_line(tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmpfs / "artifacts"
    monkeypatch.setenv("STEGOPIPE_ROOT", str(root))
    assert _invoke("run", "synthesize", "dataset.synthetic.n_train=2", "dataset.synthetic.n_val=1").exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)  # EROFS from here on
    _one_error_line(_invoke("run", "synthesize", "dataset.synthetic.n_train=3", "dataset.synthetic.n_val=1"), root)
    _one_error_line(_invoke("gc", "--yes", "--experiment", "demo"), root)
    assert "would delete synthesize-" in _invoke("gc", "--experiment", "demo").output  # a dry run only reads


def test_a_burst_of_stop_signals_unwinds_the_run_once(root: Path, tmp_path: Path) -> None:
    """SIGTERM and SIGINT together (SLURM signals every process of a job, nightly.sbatch forwards SIGINT):
    the run unwinds once, releasing the stage's lock, and exits non-zero without a traceback."""
    import psutil

    from tests.faults_util import CliRun, cli_args

    run = CliRun(cli_args("prepare", args={"split": "train"}), root, tmp_path / "cli.log", fork=True,
                 fault="prepare:start:1:STOP")  # stops itself inside the stage, holding its lock
    deadline = time.monotonic() + 120
    while psutil.Process(run.pid).status() != psutil.STATUS_STOPPED:
        assert run.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
        time.sleep(0.02)
    assert list((root / ".locks").glob("prepare-*.lock"))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCONT):
        os.kill(run.pid, sig)
    code = run.wait(120)
    assert code not in (0, -signal.SIGTERM, -signal.SIGINT), run.output()[-3000:]
    assert "Traceback" not in run.output(), run.output()[-3000:]
    assert not list((root / ".locks").glob("*.lock"))
