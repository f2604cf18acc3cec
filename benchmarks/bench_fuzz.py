"""The readers fuzzed (``tests/fuzzing.py``, issue 19): per registered case (a reader and one file it reads),
seeded mutations tried and how many were refused with our one-line error, read back harmlessly (the same
data), accepted (other data that passes the reader's checks, only for layers without a checksum) and wrong
(other data, another exception type, a multi-line message or memory beyond the bound). One row per case:
``ours`` = wrong (goal == 0), the counts in the note. ``tests.fuzzing.LONG_RUN`` mutations each
(quick: ``SHORT_RUN``), the same seed as ``make test-faults``.

Also the price of ``extract.verify_files`` (issue 19 item 3): decoding an image through the sha256 check of
its bytes vs decoding it from its path, for a 640x480 JPEG (COCO-like) and a 2048x1024 PNG (Cityscapes-like);
ratio = plain ÷ checked (1 = free), best of 9 runs of each, alternating (quick: 3); a JPEG run is 20 decodes.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, script_main, temp_root


def _best_interleaved(first: Any, second: Any, repeat: int, calls: int) -> tuple[float, float]:
    """Best wall time per call of each of two functions, timed ``calls`` calls at a time and alternately
    (so load from other jobs hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, spent in zip((first, second), times):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            spent.append((time.perf_counter() - start) / calls)
    return min(times[0]), min(times[1])


def _checked_decode_rows(repeat: int) -> list[dict[str, Any]]:
    import hashlib

    import numpy as np
    from PIL import Image

    from stages.datasets.base import decode_image_file, read_checked

    rng = np.random.default_rng(0)
    rows = []
    with temp_root() as folder:
        for name, (h, w), fmt, calls in (("jpeg 640x480", (480, 640), "JPEG", 20),
                                         ("png 2048x1024", (1024, 2048), "PNG", 1)):
            smooth = np.cumsum(np.cumsum(rng.standard_normal((h, w, 3)), 0), 1)
            smooth = (smooth - smooth.min()) / np.ptp(smooth) * 230 + rng.uniform(0, 25, (h, w, 3))  # photo-like
            pixels = smooth.astype(np.uint8)
            path = Path(folder) / f"image.{fmt.lower()}"
            Image.fromarray(pixels).save(path, format=fmt)
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            plain, checked = _best_interleaved(lambda: decode_image_file(path),
                                               lambda: decode_image_file(path, read_checked(path, sha256)), repeat,
                                               calls)
            rows.append(row(f"decode {name} with its sha256 checked", checked * 1e3, "ms", baseline=plain * 1e3,
                            higher_is_better=False, goal="ratio >= 0.7",
                            note=f"{path.stat().st_size / 1e3:.0f} kB; baseline: the same decode from the path"))
    return rows


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
                      f"peak {counts.peak_bytes / 2**20:.1f} MiB"
                      + (f"; first: {counts.failures[0][:200]}" if counts.failures else ""))))
    return rows + _checked_decode_rows(3 if quick else 9)


if __name__ == "__main__":
    script_main(run)
