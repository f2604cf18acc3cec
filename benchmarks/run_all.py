"""Run every benchmark and print one table (``make bench``); write ``results/bench.json`` and ``bench.md``.

Usage: ``python benchmarks/run_all.py [--quick] [--only NAME ...] [--out DIR]``. Modules are the
``benchmarks/bench_*.py`` files (plus the expected ones, so a missing module shows up as an error row),
imported and run one after another in this process. A module that is missing, raises, or returns rows
that break the contract (see :mod:`benchmarks.common`) gives one ``error`` row; the others still run.
The verdict of a row comes from its goal: pass / fail / n.a.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, RESULTS_DIR, check_row, error_row, format_table, verdict, write_results

BENCH_DIR = Path(__file__).resolve().parent
EXPECTED = ("extract", "store", "knn", "pca", "train_step", "crf", "demo", "cli", "fuzz")
"""Benchmarks of the issues, in run order; any other ``bench_*.py`` found runs after them."""

def module_names() -> list[str]:
    """Short names (``knn`` for ``bench_knn.py``): the expected ones first, then any others found."""
    found = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    return [*EXPECTED, *(name for name in found if name not in EXPECTED)]


def runner_of(module: ModuleType) -> Callable[..., list[dict[str, Any]]]:
    """The module's ``run(quick: bool = False) -> list[dict]`` (AttributeError naming it if absent)."""
    run = getattr(module, "run", None)
    if not callable(run):
        raise AttributeError(f"{module.__name__} has no run(quick: bool) -> list[dict] function")
    return run


def run_module(name: str, quick: bool) -> tuple[list[dict[str, Any]], float]:
    """Rows of one benchmark module (or its error row) and the seconds it took."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        rows = [check_row(dict(r)) for r in runner_of(module)(quick=quick)]
        if not rows:
            raise ValueError("returned no rows")
    except Exception as exc:  # noqa: BLE001 - one module's failure must not stop the table
        rows = [error_row(f"bench_{name}", exc)]
    return rows, time.perf_counter() - start


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("-dirty" if dirty else "")


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in about a minute")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this benchmark (knn or bench_knn; repeatable, or comma-separated)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for bench.json and bench.md")
    opts = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table

    names = module_names()
    if opts.only:
        wanted = [w.strip().removeprefix("bench_").removesuffix(".py") for o in opts.only for w in o.split(",")]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            parser.error(f"--only {', '.join(unknown)}: unknown benchmark; benchmarks: {', '.join(names)}")
        names = [n for n in names if n in wanted]

    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    durations: dict[str, float] = {}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        module_rows, seconds = run_module(name, opts.quick)
        rows += module_rows
        durations[name] = round(seconds, 1)
        print(f"[bench] {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "python": platform.python_version(), "device": _device(),
        "git": _git_sha(), "quick": opts.quick, "total_s": round(time.perf_counter() - started, 1),
        "load_avg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "module_seconds": durations,
    }
    json_path, md_path = write_results(rows, opts.out, meta)
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {meta['total_s']} s on {meta['device']}; wrote {json_path} and {md_path}")
    return 1 if any(verdict(r) == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
