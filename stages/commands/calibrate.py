"""``stegopipe calibrate``: measure this machine's stage throughputs once, for ``plan``'s time estimates.

Runs kNN, a PCA fit, a STEGO head, a probe and its evaluation (with CRF) on the synthetic dataset at two
sizes in a temporary artifact root (``stegopipe run`` in a subprocess, so nothing touches the real root),
fits each stage's cost model from the manifests there (:mod:`pipeline.estimates`: start-up seconds plus
work per second, the model ``plan`` applies; two sizes so that the start-up is measured) and writes them to
``<root>/calibration.json`` with the host, the CPU count and the date. ``plan`` uses them for stages that
have no artifacts on the root yet (their times marked ``*``), and their start-up where the root holds
one size only.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from pipeline.artifacts import ArtifactStore, utc_now, write_json_atomic
from pipeline.cli import register_command
from pipeline.config import load_config
from pipeline.errors import StegopipeError
from pipeline.estimates import CALIBRATION_FILE, models_of

STAGES = ["synthesize", "prepare", "extract", "knn", "reduce", "train-head", "probe", "evaluate"]
SIZES = (("dataset.synthetic.n_train=64", "dataset.synthetic.n_val=16", "head.steps=10", "probe.steps=10"),
         ("dataset.synthetic.n_train=192", "dataset.synthetic.n_val=48", "head.steps=40", "probe.steps=40"))
"""Two sizes 3x apart (the start-up is the intercept), small enough for a few minutes on 2 cores."""
TARGETS = (("train-head",), ("evaluate", "projection.method=pca", "projection.dim=16", "evaluate.crf=true"))


@register_command
@click.command("calibrate")
@click.argument("overrides", nargs=-1)
def calibrate_cmd(overrides: tuple[str, ...]) -> None:
    """Measure stage throughputs on synthetic data (temporary root); store them for plan's time estimates.

    OVERRIDES (key=value) change the calibration run, e.g. dataset.synthetic.n_train=512.
    """
    root = ArtifactStore(load_config().run.root).root
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stegopipe-calibrate-") as tmp:
        env = {**os.environ, "STEGOPIPE_ROOT": tmp}
        for sizes, (target, *extra) in ((s, t) for s in SIZES for t in TARGETS):
            cmd = [sys.executable, "-m", "pipeline.cli", "run", target, "--preset", "synthetic", *sizes, *extra,
                   *overrides]
            click.echo(f"calibrate: {' '.join(cmd[3:])}", err=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise StegopipeError(f"calibration run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        models = models_of(ArtifactStore(tmp), STAGES)
    record = {"models": models, "created": utc_now(), "host": platform.node(), "cpus": os.cpu_count(),
              "load_average": list(os.getloadavg()), "wall_s": round(time.perf_counter() - started, 1),
              "runs": [" ".join(t) for t in TARGETS], "sizes": [list(s) + list(overrides) for s in SIZES]}
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / CALIBRATION_FILE, record)
    click.echo(json.dumps(models, indent=2))
    click.echo(f"wrote {Path(root) / CALIBRATION_FILE} ({len(models)} models, {record['wall_s']:.0f} s)")
