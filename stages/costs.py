"""How each stage's cost scales, for ``plan``'s time estimates (:mod:`pipeline.estimates`).

Stages not listed here cost in proportion to their data (the larger of their input and output bytes):
extract (the token bytes it writes), reduce, evaluate, prepare. kNN compares every train sample with every
other (quadratic in its input's bytes) after reading the store once (linear): two phases, timed by the
stage and modelled apart, so a store read at disk speed is not taken for a slow search. Training a head or
a probe runs a fixed number of steps of a fixed batch size whatever the store holds. Kinds that cost differently per byte get models of their own: extract
by split (val also stores flipped tokens and RGB), reduce by method, evaluate with or without the CRF.
Each model also has a start-up term, fitted from the manifests (pipeline/estimates.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.estimates import default_work, register_phases, register_work


def _quadratic(params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
    return float(input_bytes) ** 2 or None


def _steps(section: str):
    def work(params: Mapping[str, Any], input_bytes: int, output_bytes: int | None) -> float | None:
        steps, batch = params.get(f"{section}.steps"), params.get(f"{section}.batch_size")
        return float(steps) * float(batch) if steps and batch else None
    return work


def _param(key: str):
    return lambda params: str(params.get(key))


register_work("knn", _quadratic)
register_phases("knn", {"read": default_work, "search": _quadratic})
register_work("train-head", _steps("head"))
register_work("probe", _steps("probe"), kind=_param("projection.method"))
register_work("extract", default_work, kind=_param("split"))
register_work("reduce", default_work, kind=_param("projection.method"))
register_work("evaluate", default_work, kind=lambda params: f"crf={params.get('evaluate.crf')}")
