"""How each stage's cost scales, for ``plan``'s time estimates (:mod:`pipeline.estimates`).

Stages not listed here cost in proportion to their data (the larger of their input and output bytes):
extract (the token bytes it writes), reduce, evaluate, prepare. kNN compares every train sample with every
other (quadratic in its input's bytes); training a head or a probe runs a fixed number of steps of a fixed
batch size whatever the store holds.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.estimates import register_work


def _quadratic(params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
    return float(input_bytes) ** 2 or None


def _steps(section: str):
    def work(params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
        steps, batch = params.get(f"{section}.steps"), params.get(f"{section}.batch_size")
        return float(steps) * float(batch) if steps and batch else None
    return work


register_work("knn", _quadratic)
register_work("train-head", _steps("head"))
register_work("probe", _steps("probe"))
