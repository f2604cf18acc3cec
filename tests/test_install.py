"""A non-editable install (``pip install .``, built from the repository) finds its presets, experiments
and storage specs as package data, and runs the demo's first stages from a folder outside the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SKIP = shutil.ignore_patterns(".git", ".venv", "artifacts", "reports", "data", "build", "*.egg-info", "__pycache__",
                              ".pytest_cache", "results")


def test_a_built_wheel_runs_the_first_demo_stages(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(REPO, source, symlinks=True, ignore=SKIP)  # the build writes build/ into its source
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert build.returncode == 0, build.stderr
    installed = target / "stages"
    assert not installed.is_symlink() and (installed / "configs" / "experiments" / "demo.yaml").is_file()
    assert (installed / "storage_specs" / "tokens.yaml").is_file()
    # the installed copy first; the dependencies from this environment's site-packages, whose .pth files
    # (the editable install's finder among them) are not processed, so the checkout is never imported
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "STEGOPIPE"))}
    env |= {"PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
            "STEGOPIPE_ROOT": str(tmp_path / "artifacts"), "PYTHONNOUSERSITE": "1"}
    script = ("import sys, pipeline, stages; from pipeline.cli import main\n"
              "assert pipeline.__file__.startswith(sys.argv[1]) and stages.__file__.startswith(sys.argv[1])\n"
              "main(sys.argv[2:], prog_name='stegopipe')\n")
    run = subprocess.run(
        [sys.executable, "-S", "-c", script, str(target), "run", "extract", "run.executor=local",
         "dataset.synthetic.n_train=4", "dataset.synthetic.n_val=2", "dataset.synthetic.height=32",
         "dataset.synthetic.width=32", "backbone.name=vit_small_patch16_224.dino", "extract.train_res=32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "artifacts" / "extract").parent.glob("*/*-*"))
    assert {"synthesize", "prepare", "extract"} <= set(made)
