"""The nightly batch scripts: bash syntax, SBATCH directives, and their behaviour with a fake ``stegopipe``
(and a fake ``scontrol``): the experiment is run, overrides pass through, the exit status propagates, a
time-limit warning (USR1) stops stegopipe with SIGINT and requeues, cron runs never overlap and log to a
dated file followed by a gc dry run."""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "scripts" / "nightly.sbatch"
CRON = REPO / "scripts" / "nightly-cron.sh"

FAKE_STEGO = f"""#!{sys.executable}
import os, signal, sys, time
log = os.environ["FAKE_LOG"]
if os.environ.get("FAKE_IGNORE_INT"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
with open(log, "a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "run" and os.environ.get("FAKE_SLEEP"):
    open(log + ".started", "w").close()
    try:
        time.sleep(float(os.environ["FAKE_SLEEP"]))
    except KeyboardInterrupt:
        with open(log, "a") as fh:
            fh.write("interrupted\\n")
        sys.exit(130)
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
"""

FAKE_SCONTROL = """#!/bin/sh
echo "scontrol $*" >> "$FAKE_LOG"
"""


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, str]:
    """Environment with a fake stegopipe (``STEGO``) and a fake ``scontrol`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("stegopipe", FAKE_STEGO), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STEGO=str(bin_dir / "stegopipe"),
               FAKE_LOG=str(tmp_path / "calls.log"), STEGOPIPE_REPO=str(tmp_path),
               STEGOPIPE_LOG_DIR=str(tmp_path / "logs"),
               STEGOPIPE_ROOT=str(tmp_path / "artifacts"), GRACE_S="5")
    return env


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_LOG"])
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("script", [SBATCH, CRON])
def test_bash_syntax_and_executable(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def test_sbatch_directives_come_before_the_first_command() -> None:
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives)  # sbatch stops reading at the first command
    options = {d.split()[1].split("=")[0] for d in directives}
    assert {"--requeue", "--signal", "--time", "--partition", "--account", "--output"} <= options
    assert "#SBATCH --signal=B:USR1@300" in directives
    text = SBATCH.read_text()
    assert re.search(r'"\$STEGO" run -v "\$EXPERIMENT" "\$\{CLUSTER_ARGS\[@\]\}"', text) and "--cluster slurm" in text
    assert "trap " in text and "scontrol requeue" in text


def test_sbatch_runs_the_experiment_on_slurm_and_passes_the_status(fakes: dict[str, str]) -> None:
    env = dict(fakes, EXPERIMENT="fig4", FAKE_STATUS="3", WORKER_PARTITION="gpu", WORKER_ACCOUNT="lab")
    done = subprocess.run(["bash", str(SBATCH), "head.steps=10"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    (call,) = calls(env)
    assert call.startswith("run -v fig4 --cluster slurm run.device=cuda run.slurm.queue=gpu run.slurm.account=lab")
    assert "run.slurm.gpus_per_job=1" in call and call.endswith(" head.steps=10")
    assert "stegopipe exited with status 3" in done.stdout


def _start_and_signal(env: dict[str, str], sig: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(["bash", str(SBATCH)], env=dict(env, FAKE_SLEEP="60"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = Path(env["FAKE_LOG"] + ".started")
    deadline = time.monotonic() + 30
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the fake stegopipe never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sbatch_time_limit_warning_stops_cleanly_and_requeues(fakes: dict[str, str]) -> None:
    env = dict(fakes, SLURM_JOB_ID="4242")
    done = _start_and_signal(env, signal.SIGUSR1)
    assert done.returncode == 130, done.stdout + done.stderr  # stegopipe's own status after SIGINT
    assert calls(env)[1:] == ["interrupted", "scontrol requeue 4242"]
    assert "time limit in 5 minutes" in done.stdout and "requeueing job 4242" in done.stdout


def test_sbatch_preemption_forwards_sigint_without_requeue(fakes: dict[str, str]) -> None:
    env = dict(fakes, SLURM_JOB_ID="4243")
    done = _start_and_signal(env, signal.SIGTERM)
    assert done.returncode == 130
    assert calls(env)[1:] == ["interrupted"]  # SLURM requeues a preempted --requeue job itself


def test_sbatch_escalates_to_sigterm_after_the_grace_period(fakes: dict[str, str]) -> None:
    env = dict(fakes, FAKE_IGNORE_INT="1", GRACE_S="1")
    start = time.monotonic()
    done = _start_and_signal(env, signal.SIGTERM)
    assert done.returncode == 128 + signal.SIGTERM and calls(env)[1:] == []
    assert 1 <= time.monotonic() - start < 20


def test_cron_runs_then_lists_garbage_into_a_dated_log(fakes: dict[str, str]) -> None:
    env = dict(fakes, FAKE_STATUS="0")
    done = subprocess.run([str(CRON), "table2", "--workers", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert calls(env) == ["run -v table2 --workers 2", "gc"]  # -v: a [hit] line per cached artifact; gc: a dry run
    log = Path(env["STEGOPIPE_LOG_DIR"]) / f"nightly-table2-{dt.date.today():%Y-%m-%d}.log"
    text = log.read_text()
    assert "stegopipe run table2 --workers 2" in text and "status 0" in text and "gc dry run" in text


def test_cron_failure_status_propagates_and_gc_still_runs(fakes: dict[str, str]) -> None:
    env = dict(fakes, FAKE_STATUS="2")
    done = subprocess.run([str(CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert calls(env) == ["run -v demo", "gc"]  # the default experiment


def test_cron_skips_while_a_previous_run_holds_the_lock(fakes: dict[str, str]) -> None:
    logs = Path(fakes["STEGOPIPE_LOG_DIR"])
    logs.mkdir()
    with open(logs / ".nightly-table2.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([str(CRON), "table2"], env=fakes, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and calls(fakes) == []
    assert "still holds the lock; skipped" in (logs / f"nightly-table2-{dt.date.today():%Y-%m-%d}.log").read_text()
