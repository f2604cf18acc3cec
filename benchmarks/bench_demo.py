"""``make demo`` wall times: cold (fresh artifact root) ≤ 300 s, warm (everything cached) ≤ 10 s.

Runs ``stegopipe run demo`` (the console script next to this interpreter, as ``make demo`` does) twice
in a subprocess with a temporary ``STEGOPIPE_ROOT`` and working directory, so nothing of the user's
artifacts or reports (``copy_to`` is relative to the working directory) is touched. The demo is
whatever ``configs/experiments/demo.yaml`` holds now. The warm run must build nothing (the CLI's
``B built`` count). Quick mode runs a one-point copy of the demo (the first value of every axis of its
last matrix block, e.g. one STEGO head: the longest chain) on a smaller synthetic dataset, and reports
the times without goals.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from benchmarks.common import REPO, row, script_main, temp_root

DEMO = REPO / "configs" / "experiments" / "demo.yaml"
SUMMARY = re.compile(r"\d+ artifacts \((\d+) built, \d+ cached\)")
QUICK_OVERRIDES = ("dataset.synthetic.n_train=16", "dataset.synthetic.n_val=8")
TIMEOUT_S = 900


def demo_command(target: str = "demo") -> list[str]:
    """``stegopipe run TARGET`` with the console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "stegopipe"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the stegopipe console script is not installed (run `make install`)")
    return [str(script), "run", target]


def quick_experiment(folder: Path) -> Path:
    """Write the one-point, small-data copy of the demo experiment into ``folder``; its path."""
    spec = yaml.safe_load(DEMO.read_text())
    blocks = spec.get("matrix") or [{}]
    last = (blocks if isinstance(blocks, list) else [blocks])[-1]
    spec["matrix"] = [{axis: (values if isinstance(values, list) else [values])[:1] for axis, values in last.items()}]
    spec["overrides"] = [*(spec.get("overrides") or []), *QUICK_OVERRIDES]
    spec["experiment"] = "demo-quick"
    path = folder / "demo-quick.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def timed_demo(command: list[str], cwd: Path, root: Path) -> tuple[float, int]:
    """Wall seconds of one demo run and the number of artifacts it built; RuntimeError if it fails.

    The count comes from the CLI's summary line ``N artifacts (B built, C cached) under ROOT``.
    """
    env = {**os.environ, "STEGOPIPE_ROOT": str(root), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[1:])}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    summary = SUMMARY.search(proc.stderr)
    if summary is None:
        raise RuntimeError(f"`{' '.join(command[1:])}` printed no 'N artifacts (B built, C cached)' summary")
    return seconds, int(summary.group(1))


def run(quick: bool = False) -> list[dict[str, Any]]:
    with temp_root("stegopipe-bench-demo-") as tmp:
        command = demo_command(str(quick_experiment(tmp)) if quick else "demo")
        cold, ran_cold = timed_demo(command, tmp, tmp / "artifacts")
        warm, ran_warm = timed_demo(command, tmp, tmp / "artifacts")
    if ran_warm:
        raise RuntimeError(f"the warm demo built {ran_warm} artifact(s); everything should have been cached")
    sizes = (f"quick: one matrix point of the demo, {' '.join(QUICK_OVERRIDES)}, no goal" if quick
             else "configs/experiments/demo.yaml as is")
    return [
        row("make demo, cold", cold, "s", goal="report" if quick else "<= 300",
            note=f"fresh artifact root, {ran_cold} artifacts built; {sizes}"),
        row("make demo, warm", warm, "s", goal="report" if quick else "<= 10",
            note="same root again: every artifact cached (0 built), so this is process start-up (imports) + planning"),
    ]


if __name__ == "__main__":
    script_main(run)
