"""What a run shows: [run]/[done] lines with labels off a terminal, cached artifacts in one line (-v lists
them), an ETA from the plan's estimates, and a Ctrl-C that says re-running resumes (without multiprocessing's
leaked-semaphore noise)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.progress import RunDisplay, duration
from tests.conftest import REPO


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_lines_off_a_terminal_carry_labels_and_cached_ones_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    labels = {"probe-1": "synthetic PCA d=4 seed=0", "extract-1": "synthetic train ViT-S/8"}
    with caplog.at_level(logging.INFO, logger="stegopipe"):
        with RunDisplay({"probe-1": "probe"}, labels, live=False) as display:
            for _ in range(54):
                display.hit("extract-1")
            display.cached_summary()
            display.start("probe-1", announce=True)
            display.done("probe-1", 2.5, "cluster mIoU 40.0")
    lines = _messages(caplog)
    assert lines == ["54 cached (-v lists them)", "[run] probe-1 synthetic PCA d=4 seed=0",
                     "[done] probe-1 synthetic PCA d=4 seed=0 in 2.5s: cluster mIoU 40.0"]


def test_verbose_lists_every_cached_artifact(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="stegopipe"):
        display = RunDisplay({}, {"a-1": "label a"}, live=False, verbose=True)
        display.hit("a-1")
        display.cached_summary()
    assert _messages(caplog) == ["[hit] a-1 label a"]


def test_eta_from_estimates_else_from_finished_stages() -> None:
    display = RunDisplay({"a-1": "a", "b-1": "b"}, {}, {"a-1": 60.0, "b-1": 120.0}, live=False)
    assert display.eta() == "ETA 3m00s (estimated)"
    display.done("a-1", 50.0)
    assert display.eta() == "ETA 2m00s (estimated)"
    unknown = RunDisplay({"a-1": "a", "b-1": "b", "c-1": "c"}, {}, {"a-1": 60.0}, live=False)
    assert unknown.eta() == ""  # nothing finished, not every stage estimated
    unknown.done("a-1", 30.0)
    assert unknown.eta() == "ETA ~1m00s (so far)"  # 2 left x 30 s
    assert duration(3725) == "1h02m"


def test_ctrl_c_says_rerunning_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "STEGOPIPE_ROOT": str(tmp_path / "artifacts")}
    env.pop("STEGOPIPE_PLUGINS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "evaluate", "--preset", "synthetic", "projection.method=pca",
         "projection.dim=4", "dataset.synthetic.n_train=4", "dataset.synthetic.n_val=2", "extract.train_res=32",
         "extract.val_res=48", "backbone.name=vit_small_patch16_224.dino"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 300
    while "[run] extract-" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert "[run] extract-" in seen, seen
    assert proc.returncode == 130, seen + rest
    assert "run the same command again to resume" in rest
    assert "leaked semaphore" not in rest


def test_relayed_bars_are_counted_even_where_tqdm_is_disabled() -> None:
    from tqdm import tqdm

    from pipeline.progress import relay_bars

    sent: list[dict[str, str]] = []
    with relay_bars("probe-1", sent.append, interval=60):
        bar = tqdm(total=10, desc="probe", unit="step", file=sys.stderr)  # its own file: the relay's wins
        bar.update(3)
        assert not bar.disable
        assert tqdm(total=5, disable=True).disable  # a stage that asks for no bar gets none (not relayed)
    assert sent == [{"artifact": "probe-1", "text": "probe: 3/10 step"}]  # once at the end, the open bar
    assert tqdm(total=2, disable=True).disable  # outside a relay (or in another thread): as the caller says


def test_a_stage_on_a_dask_worker_shows_its_own_progress(toy: Path) -> None:
    """Progress of a stage on a Dask worker reaches the client's display (its running line), as a local
    stage's own bar does; off a terminal it is not printed (one line per start and finish)."""
    from distributed import Client, LocalCluster

    from pipeline.config import load_config
    from pipeline.planner import Request, plan
    from pipeline.runner import _run_on_dask

    cfg = load_config(None, ["toy.sleep=3", "run.executor=dask"])
    tasks, _ = plan([Request("t_bars", cfg)])
    display = RunDisplay({t.id: t.stage for t in tasks}, {}, live=False)
    shown: list[str | None] = []
    follow = display.follow

    def recorded(event: object) -> None:
        follow(event)
        shown.append(display.progress.get(tasks[0].id))

    display.follow = recorded  # type: ignore[method-assign]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, display:
        _run_on_dask(client, tasks, cfg.run, set(), {}, display)
    assert shown and all(text and text.startswith("toy: ") and text.endswith("/20 step") for text in shown), shown
    assert display.progress == {}  # a finished stage shows no progress
