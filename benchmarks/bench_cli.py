"""Latency of the light CLI commands: wall time of ``stegopipe ls`` (an artifact root holding one small
artifact) next to a bare ``python -c "import click, omegaconf"`` (the floor any click + OmegaConf CLI
pays), each in a fresh process, best of 3 (quick: 2). A light command imports no stage code (no torch,
timm, scipy, zarr, dask). ratio = floor ÷ ours (1 would be no cost beyond the floor); goal ≤ 1 s.
Also reported (no goal): ``stegopipe gc`` dry run, which plans every experiment of configs/experiments, and
``stegopipe results`` / ``stegopipe plan demo`` on a root of 1,008 manifests shaped like the real stages'
(500 evaluations with their lineage: ``tests/test_labels_results.py``'s ``fake_root``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, row, script_main, temp_root


def _wall(args: list[str], env: dict[str, str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool = False) -> list[dict[str, Any]]:
    repeat = 2 if quick else 3
    with temp_root() as root:
        env = {**os.environ, "STEGOPIPE_ROOT": str(root)}
        subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "synthesize", "dataset.synthetic.n_train=2",
                        "dataset.synthetic.n_val=1"], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
        floor = _wall([sys.executable, "-c", "import click, omegaconf"], env, repeat)
        ours = _wall([sys.executable, "-m", "pipeline.cli", "ls"], env, repeat)
        gc = _wall([sys.executable, "-m", "pipeline.cli", "gc"], env, repeat)
    with temp_root() as many:
        from tests.test_labels_results import fake_root

        fake_root(many, methods=("identity", "pca", "rp", "hnne", "stego"), dims=(2, 4, 8, 16, 32, 64),
                  seeds=tuple(range(10)), datasets=("synthetic", "cityscapes"))
        env = {**os.environ, "STEGOPIPE_ROOT": str(many)}
        results = _wall([sys.executable, "-m", "pipeline.cli", "results"], env, repeat)
        plan = _wall([sys.executable, "-m", "pipeline.cli", "plan", "demo"], env, repeat)
    many_note = f"a root of 1,008 manifests (500 evaluations); fresh processes, best of {repeat}"
    return [row("stegopipe results wall time (1,008 artifacts)", results, "s", higher_is_better=False,
                goal="ours <= 1.0", note=many_note),
            row("stegopipe plan demo wall time (1,008 artifacts)", plan, "s", higher_is_better=False, note=many_note),
            row("stegopipe ls wall time", ours, "s", baseline=floor, higher_is_better=False, goal="ours <= 1.0",
                note=f"baseline: python -c 'import click, omegaconf' ({floor:.2f}s); fresh processes, best of {repeat}"),
            row("stegopipe gc (dry run) wall time", gc, "s", higher_is_better=False,
                note=f"plans every experiment; report only; fresh processes, best of {repeat}")]


if __name__ == "__main__":
    script_main(run)
