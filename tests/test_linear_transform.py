"""Linear projections on numpy batches: numpy's BLAS path equals the torch path; bad values still raise."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from stages.projections.pca import PCAProjection


def _pca() -> PCAProjection:
    x = np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)
    return PCAProjection.fit(x, standardize="fit", dim=3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_path_matches_torch_path(dtype):
    pca = _pca()
    x = np.random.default_rng(1).standard_normal((40, 6)).astype(dtype)
    out = pca.transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (40, 3)
    np.testing.assert_allclose(out, pca.transform(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tokens_raise(bad):
    x = np.ones((5, 6), np.float32)
    x[3, 2] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        _pca().transform(x)


def test_finite_tokens_whose_codes_overflow_are_not_called_non_finite():
    x = np.full((2, 6), 1e300)  # finite float64; the float32 codes overflow to inf
    assert not np.isfinite(_pca().transform(x)).all()


def test_finite_codes_whose_sum_overflows_are_returned_as_they_are():
    """The finiteness check is by the output's sum; a sum that overflows sends it to the input check."""
    pca = _pca()
    x = np.random.default_rng(2).uniform(1, 2, (4000, 6)).astype(np.float32) * 1e35
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning reaches the user
        out = pca.transform(x)
    with np.errstate(over="ignore"):
        assert np.isfinite(out).all() and not np.isfinite(out.sum())
    np.testing.assert_allclose(out, pca.transform(torch.from_numpy(x)).numpy(), rtol=1e-4)


def test_shape_errors_are_the_base_class_errors():
    with pytest.raises(InputError, match="width 5"):
        _pca().transform(np.ones((2, 5), np.float32))
    with pytest.raises(InputError, match="2-D"):
        _pca().transform(np.ones(6, np.float32))
