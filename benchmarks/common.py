"""Shared machinery of the benchmarks: result rows, goals and verdicts, timing, tables.

Every ``benchmarks/bench_*.py`` exposes ``run(quick: bool = False) -> list[dict]``; a row is::

    {"metric": str, "ours": float, "baseline": float | None, "unit": str,
     "ratio": float | None, "goal": str, "note": str}

``ratio`` is oriented so that larger is better for throughputs (ours ÷ baseline) and for times
(baseline ÷ ours, i.e. a speed-up); each module says which in the row's note.

A goal is ``"<op> <number>"`` with ``op`` one of ``>= > <= < ==``, optionally prefixed by the subject
it applies to: ``"ratio >= 0.9"`` or ``"ours <= 300"``. Without a subject it applies to the ratio when
the row has one, else to ``ours``. Any other goal (``"report"``, ``""``) gives the verdict ``n.a.``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import operator
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ("metric", "ours", "baseline", "ratio", "goal", "verdict")

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
_GOAL = re.compile(r"^\s*(?:(ratio|ours)\s+)?(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*[x×]?\s*$")


def row(metric: str, ours: float, unit: str, *, baseline: float | None = None, goal: str = "report",
        note: str = "", higher_is_better: bool = True) -> dict[str, Any]:
    """One result row; ``ratio`` = ours/baseline (``higher_is_better``) or baseline/ours, None without baseline."""
    ratio = None
    if baseline is not None and ours and baseline:
        ratio = ours / baseline if higher_is_better else baseline / ours
    return {"metric": metric, "ours": float(ours), "baseline": None if baseline is None else float(baseline),
            "unit": unit, "ratio": ratio, "goal": goal, "note": note}


def error_row(module: str, exc: BaseException) -> dict[str, Any]:
    """The row shown for a benchmark module that is missing or failed (verdict ``error``)."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return {"metric": f"{module}: failed", "ours": None, "baseline": None, "unit": "", "ratio": None,
            "goal": "", "note": text[:300], "error": True}


def parse_goal(goal: str) -> tuple[str | None, str, float] | None:
    """``(subject or None, op, value)`` of a goal string, or None when it is not a checkable goal."""
    match = _GOAL.match(goal or "")
    if match is None:
        return None
    return match.group(1), match.group(2), float(match.group(3))


def verdict(r: dict[str, Any]) -> str:
    """``pass`` / ``fail`` / ``n.a.`` of a row from its goal; ``error`` for an error row."""
    if r.get("error"):
        return "error"
    parsed = parse_goal(r.get("goal", ""))
    if parsed is None:
        return "n.a."
    subject, op, value = parsed
    if subject is None:
        subject = "ratio" if r.get("ratio") is not None else "ours"
    measured = r.get(subject)
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return "n.a."
    return "pass" if _OPS[op](float(measured), value) else "fail"


def check_row(r: dict[str, Any]) -> dict[str, Any]:
    """Validate a row from a benchmark module against the contract; returns it (ValueError otherwise)."""
    missing = [key for key in ("metric", "ours", "baseline", "unit", "ratio", "goal", "note") if key not in r]
    if missing:
        raise ValueError(f"benchmark row {r!r} lacks {', '.join(missing)}")
    for key in ("ours", "baseline", "ratio"):
        if r[key] is not None and not isinstance(r[key], int | float):
            raise ValueError(f"benchmark row {r['metric']!r}: {key}={r[key]!r} is not a number or None")
    return r


def fmt_number(value: float | None) -> str:
    """Compact human format: 3 significant digits, thousands without exponent."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    if mag >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _cells(r: dict[str, Any]) -> list[str]:
    unit = f" {r['unit']}" if r.get("unit") else ""
    ours = fmt_number(r["ours"]) + (unit if r["ours"] is not None else "")
    base = fmt_number(r["baseline"]) + (unit if r["baseline"] is not None else "")
    ratio = "-" if r["ratio"] is None else f"{fmt_number(r['ratio'])}×"
    return [r["metric"], ours, base, ratio, r.get("goal") or "", verdict(r)]


def format_table(rows: Sequence[dict[str, Any]], *, notes: bool = True) -> str:
    """A plain-text table (one line per row; notes listed below it, numbered)."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if notes:
        lines.append("")
        lines += [f"- {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines)


def to_markdown(rows: Sequence[dict[str, Any]], title: str = "Benchmarks") -> str:
    """The table as GitHub markdown, plus a note column."""
    head = [*COLUMNS, "note"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [*_cells(r), r.get("note") or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def with_verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their ``verdict`` field added (for the JSON output)."""
    return [{**r, "verdict": verdict(r)} for r in rows]


def write_results(rows: Sequence[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``bench.json`` (meta + rows with verdicts) and ``bench.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": with_verdicts(rows)}, indent=2) + "\n")
    title = "Benchmarks" + (" (quick sizes)" if meta.get("quick") else "")
    md = to_markdown(rows, title)
    md += "\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"
    md_path.write_text(md)
    return json_path, md_path


def cat_files(files: Sequence[str], streams: int) -> None:
    """``cat`` ``files`` to /dev/null in ``streams`` parallel processes, each over its own share (every
    ``streams``-th file, at most 200 files a ``cat``): the disk's rate with that many reads in flight."""
    def cat(share: Sequence[str]) -> None:
        for i in range(0, len(share), 200):
            subprocess.run(["cat", *share[i:i + 200]], stdout=subprocess.DEVNULL, check=True)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(cat, [files[i::streams] for i in range(streams)]))


def timed(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1) -> float:
    """Best (minimum) wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs.

    The minimum, not the mean: the machine is shared, and interference only ever adds time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@contextlib.contextmanager
def temp_root(prefix: str = "stegopipe-bench-") -> Iterator[Path]:
    """A fresh temporary folder (an artifact root or scratch space), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: leave as is), restoring it afterwards."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_python_child(args: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python ARGS`` in a fresh process; its last stdout line must be a JSON object, returned.

    A child that exits non-zero or prints no JSON raises RuntimeError with the tail of its stderr.
    """
    import subprocess

    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})}, check=False)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of the current address space. Not
    ``ru_maxrss``: the kernel carries that over from the forking parent through ``exec``, so a child
    started by a big process (``run_all`` after other benchmarks) reports at least the parent's RSS.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def script_main(run: Callable[..., list[dict[str, Any]]], argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/bench_x.py [--quick]``: run one module and print its rows as a table."""
    parser = argparse.ArgumentParser(description=(run.__module__ or "benchmark"))
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    opts = parser.parse_args(argv)
    print(format_table([check_row(r) for r in run(quick=opts.quick)]))
