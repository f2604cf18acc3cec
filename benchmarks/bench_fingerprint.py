"""What code fingerprints add to ``stegopipe plan demo`` (issue 18): in a fresh process, the time the
planner spends in :func:`pipeline.registry.stage_fingerprint` while planning the demo's 56 artifacts, next
to the whole plan, best of 3 (quick: 2). Warm: the parsed files are in the on-disk cache (the usual case);
cold: an empty cache (the first plan after a checkout), report only. Goal: warm ≤ 100 ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, row, script_main, temp_root

PROBE = """
import json, time
import stages.plugin  # noqa: F401
from pipeline import planner, registry
from pipeline.experiments import Experiment
spent = [0.0]
def timed(stage, _inner=registry.stage_fingerprint):
    start = time.perf_counter()
    try:
        return _inner(stage)
    finally:
        spent[0] += time.perf_counter() - start
planner.stage_fingerprint = timed
start = time.perf_counter()
tasks, _ = Experiment.load("demo").plan()
print(json.dumps({"plan_s": time.perf_counter() - start, "fingerprint_s": spent[0], "tasks": len(tasks)}))
"""


def _probe(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, check=True, capture_output=True,
                          text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict[str, Any]]:
    repeat = 2 if quick else 3
    with temp_root() as root, tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "STEGOPIPE_ROOT": str(root), "STEGOPIPE_CACHE_DIR": cache}
        cold = _probe(env)
        warm = min((_probe(env) for _ in range(repeat)), key=lambda r: r["fingerprint_s"])
    note = f"{warm['tasks']} artifacts; fresh processes, best of {repeat}"
    return [row("fingerprints in plan demo (warm cache)", warm["fingerprint_s"] * 1e3, "ms",
                baseline=warm["plan_s"] * 1e3, higher_is_better=False, goal="ours <= 100",
                note=f"baseline: the whole plan ({warm['plan_s'] * 1e3:.0f} ms); {note}"),
            row("fingerprints in plan demo (empty cache)", cold["fingerprint_s"] * 1e3, "ms",
                baseline=cold["plan_s"] * 1e3, higher_is_better=False,
                note="the first plan after a checkout parses every source file once; report only")]


if __name__ == "__main__":
    script_main(run)
