"""PCAMoments.update: stepwise float64 upcast equals the one-shot moments; bad values leave no trace."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from stages.projections import linear
from stages.projections.linear import PCAMoments


def test_stepwise_upcast_matches_one_shot(monkeypatch):
    monkeypatch.setattr(linear, "_UPCAST_ROWS", 7)  # 50 rows: 8 steps, the last one short
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float16)
    moments = PCAMoments.of(x)
    ref = x.astype(np.float64)
    assert moments.count == 50
    np.testing.assert_allclose(moments.sum, ref.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.xtx, ref.T @ ref, rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_in_a_later_step_raises_and_changes_nothing(monkeypatch, bad):
    monkeypatch.setattr(linear, "_UPCAST_ROWS", 4)
    x = np.random.default_rng(1).standard_normal((20, 3)).astype(np.float32)
    moments = PCAMoments.of(x)
    before = (moments.count, moments.sum.copy(), moments.xtx.copy())
    y = x.copy()
    y[17, 2] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        moments.update(y)
    assert moments.count == before[0]
    np.testing.assert_array_equal(moments.sum, before[1])
    np.testing.assert_array_equal(moments.xtx, before[2])


def test_huge_finite_values_are_accepted():
    # finite float64 rows whose sum overflows: the element-wise check decides (they are finite)
    x = np.full((2, 2), 1e308)
    assert PCAMoments.of(x).count == 2


def test_in_memory_fit_never_upcasts_all_rows(monkeypatch):
    import tracemalloc

    monkeypatch.setattr(linear, "_UPCAST_ROWS", 1000)
    x = np.ones((100_000, 8), dtype=np.float16)  # 1.6 MB; its float64 copy would be 6.4 MB
    tracemalloc.start()
    try:
        PCAMoments.of(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes  # one step's float64 rows (64 kB) and its products, not 4x the input
