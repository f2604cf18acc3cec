"""The readers fuzzed (``tests/fuzzing.py``, issue 19): per registered case (a reader and one file it reads),
seeded mutations tried and how many were refused with our one-line error, read back harmlessly (the same
data), accepted (other data that passes the reader's checks, only for layers without a checksum) and wrong
(other data, another exception type, a multi-line message or memory beyond the bound). One row per case:
``ours`` = wrong (goal == 0), the counts in the note. ``tests.fuzzing.LONG_RUN`` mutations each
(quick: ``SHORT_RUN``), the same seed as ``make test-faults``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, script_main


def run(quick: bool = False) -> list[dict[str, Any]]:
    import warnings

    from tests.fuzzing import LONG_RUN, SHORT_RUN, run_all

    n = SHORT_RUN if quick else LONG_RUN
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decoders warn about odd inputs; the counts are the result
        for counts in run_all(n, seed=1):
            rows.append(row(
                f"fuzz {counts.case}: wrong reads of {counts.tried} mutations", counts.wrong, "", goal="ours == 0",
                note=(f"refused {counts.refused}, harmless {counts.harmless}, accepted {counts.accepted}, "
                      f"peak traced {counts.peak_bytes / 2**20:.1f} MiB"
                      + (f"; first: {counts.failures[0][:200]}" if counts.failures else ""))))
    return rows


if __name__ == "__main__":
    script_main(run)
