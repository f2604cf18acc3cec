"""Streaming PCA, random projection and h-NNE reducers (stages/projections/); method.md §10.3–10.5, RV14."""
from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from pipeline.errors import ConfigError, InputError
from stages.projections import load_projection
from stages.projections.fitdata import sample_token_rows
from stages.projections.hnne import HNNEProjection, check_hnne_memory, hnne_memory_estimate
from stages.projections.linear import PCAMoments, accumulate_moments, pca_moments_dask
from stages.projections.pca import PCAProjection
from stages.projections.rp import RandomProjection

torch.set_num_threads(1)


def correlated(n: int = 2000, d: int = 16, seed: int = 0) -> np.ndarray:
    """Tokens with distinct channel scales, offsets and correlations (well separated eigenvalues)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, d)) * np.linspace(3.0, 0.2, d)
    mix = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (latent @ mix * rng.uniform(0.5, 4.0, d) + rng.uniform(-5, 5, d)).astype(np.float32)


def assert_rows_close_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    for ra, rb in zip(a, b):
        assert min(np.abs(ra - rb).max(), np.abs(ra + rb).max()) < atol


def assert_cols_close_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    assert_rows_close_up_to_sign(a.T, b.T, atol)


# ---------------------------------------------------------------------------------------------- PCA


def test_pca_fit_standardized_equals_sklearn() -> None:
    x = correlated()
    z = StandardScaler().fit_transform(x.astype(np.float64))
    ref = PCA().fit(z)
    pca = PCAProjection.fit(x, standardize="fit")
    assert pca.n_components == 16 and pca.dim == 16 and pca.n_samples == 2000
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(pca.explained_variance, ref.explained_variance_, rtol=1e-6)
    assert_rows_close_up_to_sign(pca.components, ref.components_, atol=1e-4)
    # same sign convention as sklearn's svd_flip: identical, not only up to sign
    np.testing.assert_allclose(pca.components, ref.components_, atol=1e-4)
    np.testing.assert_allclose(pca.mean, x.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(pca.scale, x.astype(np.float64).std(0), rtol=1e-8)
    np.testing.assert_allclose(pca.with_dim(5).transform(x), ref.transform(z)[:, :5], atol=1e-4)


def test_pca_none_equals_sklearn_on_raw_tokens() -> None:
    x = correlated(seed=1)
    ref = PCA().fit(x.astype(np.float64))
    pca = PCAProjection.fit(x, standardize="none")
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(pca.explained_variance, ref.explained_variance_, rtol=1e-6)
    assert_rows_close_up_to_sign(pca.components, ref.components_, atol=1e-4)
    np.testing.assert_array_equal(pca.scale, np.ones(16))
    np.testing.assert_allclose(pca.transform(x.astype(np.float64)), ref.transform(x.astype(np.float64)), atol=1e-4)


def test_pca_dim_slicing_and_range() -> None:
    x = correlated(500)
    pca = PCAProjection.fit(x, dim=16)
    full = pca.transform(x)
    three = pca.with_dim(3)
    assert three.dim == 3 and three.components is pca.components
    np.testing.assert_allclose(three.transform(x), full[:, :3], rtol=1e-5, atol=1e-5)
    assert PCAProjection.fit(x, dim=4).dim == 4
    for bad in (0, 17):
        with pytest.raises(ConfigError, match=f"dim={bad}"):
            pca.with_dim(bad)


def test_pca_transform_torch_and_feature_map() -> None:
    x = correlated(300)
    pca = PCAProjection.fit(x, dim=4)
    t = torch.from_numpy(x)
    out = pca.transform(t)
    assert isinstance(out, torch.Tensor) and out.shape == (300, 4) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), pca.transform(x), rtol=1e-6, atol=1e-5)
    fmap = t[:24].reshape(2, 3, 4, 16).permute(0, 3, 1, 2)  # [B, D, h, w]
    codes = pca.transform_map(fmap)
    assert codes.shape == (2, 4, 3, 4)
    np.testing.assert_allclose(codes.permute(0, 2, 3, 1).reshape(24, 4).numpy(), pca.transform(x[:24]), atol=1e-5)
    with pytest.raises(InputError, match="tokens have width 8, projection expects 16"):
        pca.transform(x[:, :8])


def test_pca_needs_two_tokens_and_a_known_mode() -> None:
    with pytest.raises(InputError, match="at least 2"):
        PCAProjection.fit(np.ones((1, 3)))
    with pytest.raises(ConfigError, match="standardize='zscore'"):
        PCAProjection.fit(correlated(10), standardize="zscore")  # type: ignore[arg-type]


def test_pca_constant_channel_gets_unit_scale() -> None:
    x = correlated(400, 6).astype(np.float64)
    x[:, 2] = 7.25
    pca = PCAProjection.fit(x, standardize="fit")
    ref = PCA().fit(StandardScaler().fit_transform(x))
    assert pca.scale[2] == 1.0
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6, atol=1e-12)


def test_cumulative_evr_curve() -> None:
    pca = PCAProjection.fit(correlated(400))
    frac, cum = pca.cumulative_evr_curve()
    np.testing.assert_allclose(frac, np.arange(1, 17) / 16)
    np.testing.assert_allclose(cum, np.cumsum(pca.explained_variance_ratio))
    assert cum[-1] == pytest.approx(1.0) and np.all(np.diff(cum) >= 0)
    grid, icum = pca.cumulative_evr_curve(num_points=768)
    assert grid.shape == icum.shape == (768,)
    assert icum[0] == 0.0 and icum[-1] == pytest.approx(1.0)
    assert np.interp(1 / 16, grid, icum) == pytest.approx(cum[0], rel=1e-3)


def test_rv14_batch_standardisation() -> None:
    """RV14: per-batch z-score then components[:3].T equals pca.transform of the batch-standardised tokens."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2000, 16)).astype(np.float32)
    scaler = StandardScaler().fit(data)
    ref = PCA().fit(scaler.transform(data))
    batch = rng.standard_normal((3, 16, 4, 4)).astype(np.float32)
    tokens = batch.transpose(0, 2, 3, 1).reshape(-1, 16)
    batch_std = StandardScaler().fit_transform(tokens.astype(np.float64))
    expected = ref.transform(batch_std)[:, :3]  # subtracts mean_ (~0): "equal up to mean_"
    assert np.abs(ref.mean_).max() < 1e-6

    pca = PCAProjection.fit(data, standardize="batch", dim=3)
    codes = pca.transform_map(torch.from_numpy(batch))
    assert codes.shape == (3, 3, 4, 4)
    got = codes.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    assert_cols_close_up_to_sign(got, expected, atol=1e-4)
    np.testing.assert_allclose(got, batch_std @ pca.components[:3].T, atol=1e-5)
    # the codes depend on the batch: the same tokens inside a different batch project differently
    alone = pca.transform(tokens[:16])
    assert np.abs(alone - got[:16]).max() > 1e-2


# ---------------------------------------------------------------------------------------------- moments


def test_moments_merge_and_update() -> None:
    x = correlated(1000).astype(np.float64)
    whole = PCAMoments.of(x)
    a, b = PCAMoments.of(x[:317]), PCAMoments.of(x[317:])
    merged = a.merge(b)
    assert merged.count == 1000 and a.count == 317  # merge returns a new object
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.xtx, whole.xtx, rtol=1e-12)
    np.testing.assert_allclose(whole.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.covariance(), np.cov(x.T, bias=True), rtol=1e-9, atol=1e-9)
    streamed = PCAMoments.empty(16)
    for start in range(0, 1000, 128):
        streamed.update(x[start : start + 128])
    np.testing.assert_allclose(streamed.xtx, whole.xtx, rtol=1e-12)
    with pytest.raises(InputError, match="merge moments of width 16 and 3"):
        whole.merge(PCAMoments.empty(3))


def test_moments_upcast_float16_and_leading_axes() -> None:
    h = correlated(64).astype(np.float16).reshape(4, 4, 4, 16)
    m = PCAMoments.of(h)
    x64 = h.reshape(-1, 16).astype(np.float64)
    assert m.count == 64
    np.testing.assert_array_equal(m.xtx, x64.T @ x64)
    np.testing.assert_array_equal(PCAMoments.of(torch.from_numpy(h)).sum, m.sum)


def test_moments_reject_bad_chunks() -> None:
    m = PCAMoments.empty(4)
    with pytest.raises(InputError, match="width 3, moments have width 4"):
        m.update(np.zeros((2, 3)))
    bad = np.zeros((2, 4))
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        m.update(bad)
    with pytest.raises(InputError, match="floating point"):
        m.update(np.zeros((2, 4), np.int32))
    assert m.count == 0


def test_dask_moments_equal_numpy() -> None:
    x = correlated(1000)
    ref = PCAMoments.of(x)
    for chunks in ((97, 16), (250, 5)):  # many row blocks (tree of depth 2); column-split input is rechunked
        got = pca_moments_dask(da.from_array(x, chunks=chunks), split_every=3)
        assert got.count == ref.count
        np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-12)
        np.testing.assert_allclose(got.xtx, ref.xtx, rtol=1e-12)
    grid = da.from_array(x.reshape(10, 10, 10, 16), chunks=(1, 10, 10, 16))  # one sample per chunk
    got = pca_moments_dask(grid)
    assert got.count == 1000
    np.testing.assert_allclose(got.xtx, ref.xtx, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_accumulate_moments_backends(backend: str) -> None:
    x = correlated(600)
    ref = PCAMoments.of(x)
    got = accumulate_moments((x[i : i + 100] for i in range(0, 600, 100)), backend=backend)
    assert got.count == 600
    np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-12)
    np.testing.assert_allclose(got.xtx, ref.xtx, rtol=1e-12)
    with pytest.raises(InputError, match="no chunks"):
        accumulate_moments(iter([]), backend=backend)
    bad = x[:10].copy()
    bad[3, 3] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        accumulate_moments([x[:10], bad], backend=backend)


def test_accumulate_moments_backend_choice() -> None:
    with pytest.raises(ConfigError, match="backend='gpu'"):
        accumulate_moments([np.zeros((2, 2))], backend="gpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs cupy"):
            accumulate_moments([np.zeros((2, 2))], backend="cupy")
    got = accumulate_moments([np.ones((3, 2))], backend="auto")
    assert got.count == 3 and np.allclose(got.sum, 3.0)


# ---------------------------------------------------------------------------------------------- RP


def test_random_projection_orthonormal_and_seeded() -> None:
    rp = RandomProjection.fit(64, 12, seed=3)
    assert rp.matrix.shape == (64, 12) and rp.dim == 12 and rp.in_dim == 64
    np.testing.assert_allclose(rp.matrix.T @ rp.matrix, np.eye(12), atol=1e-12)
    np.testing.assert_array_equal(RandomProjection.fit(64, 12, seed=3).matrix, rp.matrix)
    assert np.abs(RandomProjection.fit(64, 12, seed=4).matrix - rp.matrix).max() > 0.1
    # the matrix is the sign-fixed Q of the seeded Gaussian draw
    q, r = np.linalg.qr(np.random.default_rng(3).standard_normal((64, 12)))
    np.testing.assert_allclose(rp.matrix, q * np.sign(np.diag(r)), atol=1e-12)


def test_random_projection_standardize_modes() -> None:
    x = correlated(400)
    x64 = x.astype(np.float64)
    rp = RandomProjection.fit(16, 5, seed=0)
    np.testing.assert_allclose(rp.transform(x64), x64 @ rp.matrix, rtol=1e-6, atol=1e-6)
    batch = RandomProjection.fit(16, 5, seed=0, standardize="batch")
    np.testing.assert_allclose(
        batch.transform(x64), StandardScaler().fit_transform(x64) @ rp.matrix, rtol=1e-6, atol=1e-6
    )
    moments = PCAMoments.of(x)
    fit = RandomProjection.fit(16, 5, seed=0, standardize="fit", moments=moments)
    np.testing.assert_allclose(fit.transform(x64[:7]), batch.transform(x64)[:7], rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="needs the fit moments"):
        RandomProjection.fit(16, 5, seed=0, standardize="fit")
    with pytest.raises(ConfigError, match="dim=17"):
        RandomProjection.fit(16, 17, seed=0)


# ---------------------------------------------------------------------------------------------- h-NNE


def clustered(n: int = 2400, d: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, d)) * 4
    return (np.repeat(centers, n // 6, axis=0) + rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize(("version", "dim"), [("v1", 2), ("v1", 5), ("v2", 3)])
def test_hnne_matches_hnne_transform(version: str, dim: int) -> None:
    from hnne import HNNE

    x = clustered()
    proj = HNNEProjection.fit(x, dim=dim, seed=0, version=version)
    assert proj.dim == dim and proj.in_dim == 12 and proj.n_clusters > 6
    assert ("inflation_rot" in proj.arrays) == (dim <= 3)
    np.testing.assert_allclose(proj.scale, x.astype(np.float64).std(0), rtol=1e-8)
    queries = clustered(300, seed=1).astype(np.float64)
    got = proj.transform(queries)
    assert got.shape == (300, dim) and got.dtype == np.float32 and np.isfinite(got).all()

    z = ((x.astype(np.float64) - proj.mean) / proj.scale).astype(np.float32)
    model = HNNE(n_components=dim, metric="cosine", hnne_version=version, random_state=0)
    model.fit(z)
    expected = model.transform((queries - proj.mean) / proj.scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        proj.apply_hnne((queries - proj.mean) / proj.scale), expected, rtol=1e-10, atol=1e-10
    )


def test_hnne_save_load_identical_and_seeded(tmp_path: Path) -> None:
    x = clustered(1800)
    proj = HNNEProjection.fit(x, dim=4, seed=7, version="v1", standardize="batch")
    proj.save(tmp_path)
    loaded = load_projection(tmp_path)
    assert isinstance(loaded, HNNEProjection)
    assert (loaded.metric, loaded.version, loaded.seed, loaded.standardize) == ("cosine", "v1", 7, "batch")
    q = clustered(204, seed=2)
    np.testing.assert_array_equal(loaded.transform(q), proj.transform(q))
    again = HNNEProjection.fit(x, dim=4, seed=7, version="v1", standardize="batch")
    np.testing.assert_array_equal(again.transform(q), proj.transform(q))


def test_hnne_memory_guard() -> None:
    assert hnne_memory_estimate(1_000_000, 768) == 16 * 768 * 10**6 + 1024 * 10**6 + 2**30
    # below h-NNE's exact-1-NN threshold FINCH holds dense n×n distances
    assert hnne_memory_estimate(1000, 10) == 16 * 10 * 1000 + 1024 * 1000 + 12 * 1000**2 + 2**30
    assert hnne_memory_estimate(20_001, 10) < hnne_memory_estimate(20_000, 10)
    check_hnne_memory(1000, 8, available_bytes=2**31)
    with pytest.raises(ConfigError, match=r"h-NNE on a subsample of 1000000 tokens × 768 needs about 13\.4 GiB"):
        check_hnne_memory(1_000_000, 768, available_bytes=8 * 2**30)
    with pytest.raises(ConfigError, match="lower the number of tokens"):
        HNNEProjection.fit(clustered(600), dim=2, seed=0, available_bytes=1024)


def test_hnne_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="dim=13"):
        HNNEProjection.fit(clustered(600), dim=13, seed=0)
    with pytest.raises(ConfigError, match="version='v3'"):
        HNNEProjection.fit(clustered(600), dim=2, seed=0, version="v3")
    bad = clustered(600)
    bad[5, 5] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        HNNEProjection.fit(bad, dim=2, seed=0)


def test_sample_token_rows() -> None:
    rows = sample_token_rows(10_000, 1000, seed=0)
    assert rows.dtype == np.int64 and rows.shape == (1000,)
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 10_000
    np.testing.assert_array_equal(sample_token_rows(10_000, 1000, seed=0), rows)
    assert not np.array_equal(sample_token_rows(10_000, 1000, seed=1), rows)
    np.testing.assert_array_equal(sample_token_rows(50, 80, seed=0), np.arange(50))
    with pytest.raises(ConfigError, match=">= 1"):
        sample_token_rows(50, 0, seed=0)


# ---------------------------------------------------------------------------------------------- save/load


def test_every_kind_roundtrips_through_load_projection(tmp_path: Path) -> None:
    x = clustered(1200)
    moments = PCAMoments.of(x)
    projections = {
        "pca_fit": PCAProjection.from_moments(moments, standardize="fit", dim=5),
        "pca_none": PCAProjection.from_moments(moments, standardize="none", dim=3),
        "pca_batch": PCAProjection.from_moments(moments, standardize="batch"),
        "rp_none": RandomProjection.fit(12, 4, seed=1),
        "rp_fit": RandomProjection.fit(12, 4, seed=1, standardize="fit", moments=moments),
        "hnne": HNNEProjection.fit(x, dim=3, seed=0),
    }
    q = clustered(120, seed=5)
    for name, proj in projections.items():
        proj.save(tmp_path / name)
        assert not list((tmp_path / name).glob("*.pkl"))
        loaded = load_projection(tmp_path / name)
        assert type(loaded) is type(proj) and loaded.kind == proj.kind
        assert (loaded.in_dim, loaded.dim) == (proj.in_dim, proj.dim)
        np.testing.assert_array_equal(loaded.transform(q), proj.transform(q), err_msg=name)
    pca = load_projection(tmp_path / "pca_fit")
    assert isinstance(pca, PCAProjection) and pca.n_components == 12 and pca.standardize == "fit"
    np.testing.assert_array_equal(pca.explained_variance_ratio, projections["pca_fit"].explained_variance_ratio)
