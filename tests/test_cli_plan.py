"""The CLI a researcher lives in: plan/status, problems reported at once, ls/show summaries, pins and safe
gc, did-you-mean, completion, readable non-TTY output, skipped inputs on the console."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import planner, registry
from pipeline.artifacts import ArtifactStore
from pipeline.cli import main, params_summary
from tests.conftest import REPO

SMALL = ("dataset.synthetic.n_train=4", "dataset.synthetic.n_val=2")


def _invoke(*args: str, **kwargs: object) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)  # type: ignore[arg-type]


def test_plan_shows_cached_missing_running_with_the_lock_holder(toy: Path) -> None:
    assert _invoke("run", "t_left").exit_code == 0
    store = ArtifactStore(toy)
    tasks, _ = planner.plan([planner.Request("t_join", runner_cfg())])
    right = next(t.id for t in tasks if t.stage == "t_right")
    lock = store.lock(right)
    assert lock.try_acquire()  # a live run of t_right (this process)
    try:
        result = _invoke("status", "t_join")
    finally:
        lock.release()
    assert result.exit_code == 0, result.output
    lines = {line.split("]", 1)[1].split()[0]: line for line in result.output.splitlines() if line.startswith("[")}
    assert " cached " in lines["t_source"] and " cached " in lines["t_left"]
    assert " running " in lines["t_right"] and " missing " in lines["t_join"]
    assert f"held by pid {os.getpid()}" in result.output
    assert "2 cached" in result.output and "1 running" in result.output and "1 missing" in result.output
    assert "[1],[2]" in lines["t_join"] or "[2],[3]" in lines["t_join"]  # its inputs, by number
    assert not (toy / "t_join").exists()  # plan ran nothing


def runner_cfg() -> object:
    from pipeline.config import load_config

    return load_config(None, [])


def test_every_missing_need_at_once_and_run_starts_nothing(toy: Path, tmp_path: Path) -> None:
    log = tmp_path / "toy.log"
    missing = [registry.Need("data root", str(tmp_path / "nowhere"), "DATA_ROOT=DIR", False),
               registry.Need("weights", str(tmp_path / "w.pth"), "WEIGHTS_DIR=DIR", False)]
    registry.register_needs("t_right", lambda cfg, args: missing)
    try:
        planned = _invoke("plan", "t_join", f"toy.log={log}")
        ran = _invoke("run", "t_join", f"toy.log={log}")
    finally:
        del registry.NEEDS["t_right"]
    assert planned.exit_code == 1 and "2 problems" in planned.stderr
    assert "needs weights: " in planned.output and "MISSING (set WEIGHTS_DIR=DIR)" in planned.output
    assert ran.exit_code == 2 and "DATA_ROOT=DIR" in ran.stderr and "WEIGHTS_DIR=DIR" in ran.stderr
    assert not log.exists()  # not even t_source ran


def test_paper_experiment_lists_all_weights_and_data_roots(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEGOPIPE_DATA_ROOT", raising=False)
    monkeypatch.delenv("STEGOPIPE_WEIGHTS_DIR", raising=False)
    monkeypatch.chdir(root.parent)  # no ./data here
    result = _invoke("plan", "table2")
    assert result.exit_code == 1
    for dataset in ("cocostuff", "cityscapes", "potsdam"):
        assert f"data root {root.parent / 'data' / dataset} does not exist" in result.stderr
    assert result.stderr.count("WEIGHTS_DIR") >= 2 and "STEGOPIPE_DATA_ROOT" in result.stderr
    assert "dino_vitbase8_pretrain.pth" in result.stderr and "dino_deitsmall8_300ep_pretrain.pth" in result.stderr
    run = _invoke("run", "prepare", "--preset", "cocostuff27")
    assert run.exit_code == 2 and "DATA_ROOT" in run.stderr and not (root / "prepare").exists()


def test_plan_estimates_missing_tokens(root: Path) -> None:
    result = _invoke("plan", "extract", "--preset", "synthetic", *SMALL, "extract.train_res=64")
    line = next(line for line in result.output.splitlines() if " extract " in line)
    assert "~196.6 KB" in line  # 4 samples × 8 × 8 tokens × 384 dims × 2 bytes


def test_ls_header_params_json_and_unknown_stage(root: Path) -> None:
    for seed in (0, 1):
        assert _invoke("run", "synthesize", *SMALL, f"dataset.synthetic.seed={seed}").exit_code == 0
    listing = _invoke("ls")
    assert listing.stdout.splitlines()[0].split() == ["ID", "CREATED", "WALL", "SIZE", "LABEL"]
    assert "seed=0" in listing.output and "seed=1" in listing.output
    rows = json.loads(_invoke("ls", "--json").output)
    assert sorted(r["params"]["dataset.synthetic.seed"] for r in rows) == [0, 1] and all(r["bytes"] > 0 for r in rows)
    bad = _invoke("ls", "synthesise")
    assert bad.exit_code == 2 and "did you mean synthesize" in bad.stderr


def test_params_summary_tells_reducers_apart() -> None:
    pca = params_summary({"standardize": "fit", "fit": {"subset": "all"}, "method": "pca"})
    rp = params_summary({"standardize": "fit", "dim": 4, "seed": 0, "method": "rp"})
    assert pca.startswith("method=pca") and rp.startswith("method=rp dim=4 seed=0")
    assert len(params_summary({f"k{i}": "v" * 20 for i in range(20)}, 40)) == 40
    # a telling key that stands twice (the reducer's seed and the projection's seed) keeps its full path
    both = params_summary({"method": "rp", "seed": 0, "projection": {"seed": 1}}, 200)
    assert "seed=0" in both and "projection.seed=1" in both and both.count(" seed=") == 1


def test_did_you_mean_for_presets_and_targets(root: Path) -> None:
    preset = _invoke("run", "prepare", "--preset", "synthetc")
    assert preset.exit_code == 2 and "did you mean synthetic" in preset.stderr
    target = _invoke("plan", "dmeo")
    assert target.exit_code == 2 and "did you mean demo" in target.stderr


def test_pins_protect_from_gc(root: Path) -> None:
    assert _invoke("run", "synthesize", *SMALL).exit_code == 0
    artifact = ArtifactStore(root).ids()[0]
    assert "pinned " + artifact in _invoke("pin", artifact[:14]).output
    assert "[pinned]" in _invoke("ls").output and "pinned" in _invoke("show", artifact).output
    kept = _invoke("gc", "--yes", "--keep-experiment", "demo")
    assert kept.exit_code == 0 and artifact not in kept.output and (root / "synthesize" / artifact).is_dir()
    assert "unpinned " + artifact in _invoke("unpin", artifact).output
    gone = _invoke("gc", "--yes", "--experiment", "demo")
    assert f"deleted {artifact}" in gone.output and not (root / "synthesize" / artifact).exists()


def test_gc_dry_run_is_concise_and_yes_refuses(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEGOPIPE_WEIGHTS_DIR", raising=False)
    assert _invoke("run", "synthesize", *SMALL).exit_code == 0
    dry = _invoke("gc")
    notes = [line for line in dry.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "table2" in notes[0] and "stegopipe plan" in notes[0]
    assert "KB" in dry.output and "to free (dry run" in dry.stderr
    refused = _invoke("gc", "--yes")
    assert refused.exit_code == 2 and "--experiment NAME" in refused.stderr and "stegopipe pin" in refused.stderr
    assert any((root / "synthesize").iterdir())


def test_completion_offers_stages_and_experiments(root: Path) -> None:
    env = {"_STEGOPIPE_COMPLETE": "bash_complete", "COMP_WORDS": "stegopipe run de", "COMP_CWORD": "2"}
    result = CliRunner().invoke(main, [], prog_name="stegopipe", env=env)
    assert "plain,demo" in result.output
    env["COMP_WORDS"] = "stegopipe ls tr"
    result = CliRunner().invoke(main, [], prog_name="stegopipe", env=env)
    assert "plain,train-head" in result.output


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=300)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_non_tty_output_has_no_bars_and_lists_skipped_inputs(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(data / "imgs" / "train" / f"img{i}.png", rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    (data / "imgs" / "train" / "broken.png").write_bytes(b"not a png")
    result = _cli("run", "prepare", "dataset.name=folder", f"dataset.root={data}", "dataset.n_classes=3",
                  "dataset.on_bad_input=skip")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "[done] prepare-" in result.stderr
    assert "skipped 1 bad input" in result.stderr and "broken" in result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert "broken" in (path / "log.txt").read_text()  # and kept in the artifact's log
    on_dask = _cli("run", "prepare", "dataset.name=folder", f"dataset.root={data}", "dataset.n_classes=3",
                   "dataset.on_bad_input=skip", "--force", "prepare", "--executor", "dask", "--workers", "1")
    assert on_dask.returncode == 0 and "skipped 1 bad input" in on_dask.stderr  # from the worker's manifest


def test_dask_run_output_is_line_by_line(toy: Path, tmp_path: Path) -> None:
    result = _cli("run", "t_join", "--executor", "dask", "--workers", "2", f"toy.log={tmp_path / 'toy.log'}")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr  # no bars when stderr is not a terminal
    assert sum(line.startswith("[done] t_") for line in lines) == 4  # one line per stage, never glued
    assert all(line.startswith(("[", "4 artifacts")) for line in lines), lines


def test_plan_names_the_weights_it_reads(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "dino_vitbase8_pretrain.pth").write_bytes(b"not really a checkpoint")  # only hashed by plan
    monkeypatch.setenv("STEGOPIPE_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("STEGOPIPE_DATA_ROOT", str(tmp_path / "data"))
    result = _invoke("plan", "extract", "--preset", "cocostuff27")
    assert f"needs weights: {weights / 'dino_vitbase8_pretrain.pth'}  ok" in result.output
    assert f"needs data root: {tmp_path / 'data' / 'cocostuff'}  MISSING" in result.output
    assert result.exit_code == 1 and "STEGOPIPE_DATA_ROOT" in result.stderr
