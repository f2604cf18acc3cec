"""Benchmark table machinery: rows, goals, verdicts, tables, run_all with good, failing and missing modules.

No benchmark is timed here (ratios are measured by `make bench`, never asserted in tests).
"""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from benchmarks import run_all
from benchmarks.common import (
    check_row,
    error_row,
    fmt_number,
    format_table,
    parse_goal,
    row,
    to_markdown,
    verdict,
    write_results,
)


def test_row_ratio_orientation() -> None:
    assert row("thr", 90.0, "img/s", baseline=100.0)["ratio"] == pytest.approx(0.9)
    assert row("time", 2.0, "s", baseline=6.0, higher_is_better=False)["ratio"] == pytest.approx(3.0)
    lone = row("rss", 1500.0, "MB")
    assert lone["ratio"] is None and lone["baseline"] is None
    assert set(lone) == {"metric", "ours", "baseline", "unit", "ratio", "goal", "note"}


@pytest.mark.parametrize(("goal", "parsed"), [
    (">= 0.9", (None, ">=", 0.9)),
    ("ratio >= 2", ("ratio", ">=", 2.0)),
    ("ours <= 2048", ("ours", "<=", 2048.0)),
    ("<= 1e-6", (None, "<=", 1e-6)),
    (">= 1×", (None, ">=", 1.0)),
    ("report", None),
    ("", None),
])
def test_parse_goal(goal: str, parsed: tuple | None) -> None:
    assert parse_goal(goal) == parsed


def test_verdicts() -> None:
    assert verdict(row("a", 95.0, "img/s", baseline=100.0, goal=">= 0.9")) == "pass"
    assert verdict(row("a", 85.0, "img/s", baseline=100.0, goal=">= 0.9")) == "fail"
    # without a subject the goal applies to the ratio when there is one, else to ours
    assert verdict(row("demo", 250.0, "s", goal="<= 300")) == "pass"
    assert verdict(row("demo", 12.0, "s", goal="<= 10")) == "fail"
    # an explicit subject wins even when a ratio exists
    rss = row("rss", 1500.0, "MB", baseline=3000.0, higher_is_better=False, goal="ours <= 2048")
    assert rss["ratio"] == pytest.approx(2.0) and verdict(rss) == "pass"
    assert verdict({**rss, "ours": 2100.0}) == "fail"
    assert verdict(row("read", 5.0, "ms", baseline=1.0, goal="report")) == "n.a."
    assert verdict(row("x", 1.0, "s", goal="ratio >= 1")) == "n.a."  # no ratio to judge
    assert verdict(row("x", math.nan, "s", goal="<= 1")) == "n.a."
    assert verdict(error_row("bench_x", RuntimeError("boom"))) == "error"


def test_check_row_rejects_contract_breaks() -> None:
    good = row("a", 1.0, "s")
    assert check_row(good) is good
    with pytest.raises(ValueError, match="lacks goal"):
        check_row({k: v for k, v in good.items() if k != "goal"})
    with pytest.raises(ValueError, match="not a number"):
        check_row({**good, "ours": "fast"})


def test_fmt_number() -> None:
    assert fmt_number(None) == "-"
    assert fmt_number(1234567.8) == "1,234,568"
    assert fmt_number(0.912345) == "0.912"
    assert fmt_number(0.00012) == "1.20e-04"
    assert fmt_number(0.0) == "0"


def test_table_and_markdown_show_every_row_with_its_verdict() -> None:
    rows = [row("extract", 95.0, "img/s", baseline=100.0, goal=">= 0.9", note="side by side"),
            row("kNN time", 4.0, "s", baseline=8.0, higher_is_better=False, goal=">= 1"),
            error_row("bench_crf", ImportError("no module named pydensecrf"))]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "ours", "baseline", "ratio", "goal", "verdict"]
    assert set(lines[1]) <= {"-", " "}
    assert "95 img/s" in lines[2] and "0.95×" in lines[2] and lines[2].endswith("pass")
    assert "2×" in lines[3] and lines[3].endswith("pass")
    assert lines[4].startswith("bench_crf: failed") and lines[4].endswith("error")
    assert "- extract: side by side" in table and "no module named pydensecrf" in table
    md = to_markdown(rows).splitlines()
    assert md[2] == "| metric | ours | baseline | ratio | goal | verdict | note |"
    assert len([ln for ln in md if ln.startswith("| ")]) == 1 + len(rows)


def test_write_results(tmp_path: Path) -> None:
    rows = [row("a", 2.0, "s", baseline=1.0, goal=">= 1")]
    json_path, md_path = write_results(rows, tmp_path / "results", {"quick": True, "total_s": 1.5})
    data = json.loads(json_path.read_text())
    assert data["meta"]["quick"] is True and data["rows"][0]["verdict"] == "pass"
    assert data["rows"][0]["ratio"] == pytest.approx(2.0)
    assert md_path.read_text().startswith("# Benchmarks (quick sizes)")


FAKE_NAMES = ["fake_good", "fake_bad", "fake_missing"]


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Three benchmark modules (good, raising, missing); returns what the good one saw (its quick flag)."""
    seen: dict[str, bool] = {}

    def good_run(quick: bool = False) -> list[dict]:
        seen["quick"] = quick
        return [row("fake throughput", 9.0, "it/s", baseline=10.0, goal=">= 0.5")]

    def bad_run(quick: bool = False) -> list[dict]:
        raise RuntimeError("kaboom")

    for name, fn in (("fake_good", good_run), ("fake_bad", bad_run)):
        module = types.ModuleType(f"benchmarks.bench_{name}")
        module.run = fn  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(run_all, "module_names", lambda: FAKE_NAMES)
    monkeypatch.setattr(run_all, "_device", lambda: "cpu (test)")
    return seen


def test_run_all_reports_failures_and_keeps_going(fake_modules: dict[str, bool], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status = run_all.main(["--quick", "--out", str(tmp_path)])
    assert status == 1  # error rows make the command fail
    assert fake_modules["quick"] is True
    data = json.loads((tmp_path / "bench.json").read_text())
    by_metric = {r["metric"]: r for r in data["rows"]}
    assert by_metric["fake throughput"]["verdict"] == "pass"
    assert by_metric["bench_fake_bad: failed"]["verdict"] == "error"
    assert "kaboom" in by_metric["bench_fake_bad: failed"]["note"]
    assert "ModuleNotFoundError" in by_metric["bench_fake_missing: failed"]["note"]
    assert set(data["meta"]["module_seconds"]) == set(FAKE_NAMES) and data["meta"]["quick"] is True
    out = capsys.readouterr().out
    assert "fake throughput" in out and "bench_fake_missing: failed" in out
    assert (tmp_path / "bench.md").read_text().count("| bench_fake_") == 2



def test_run_all_only_selects_and_rejects_unknown(fake_modules: dict[str, bool], tmp_path: Path) -> None:
    assert run_all.main(["--only", "bench_fake_good", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["metric"] for r in data["rows"]] == ["fake throughput"] and fake_modules["quick"] is False
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "nope", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_module_names_lists_expected_then_found() -> None:
    names = run_all.module_names()
    assert names[:len(run_all.EXPECTED)] == list(run_all.EXPECTED)
    assert len(names) == len(set(names))


def test_peak_rss_of_a_child_is_its_own() -> None:
    """A child of a big process reports its own peak, not the parent's (ru_maxrss would)."""
    import numpy as np

    from benchmarks.common import peak_rss_mb, run_python_child

    ballast = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB resident in this process
    assert peak_rss_mb() >= 300
    code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks.common import peak_rss_mb; "
            "print(json.dumps({'peak': peak_rss_mb()}))")
    child = run_python_child(["-c", code], timeout_s=60)
    assert 0 < child["peak"] < 200
    del ballast
