"""kNN math: RV9, blocked top-k against brute force, tie/self rules, npz format, store streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from stages.stego.knn import (
    _topk_torch,
    descriptors_from_store,
    global_descriptors,
    load_nns_npz,
    save_nns_npz,
    spatial_means,
    topk_neighbors,
)
from stages.store import create_token_store, shard_ranges, write_shard


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full N×N cosine matrix (float64), self first, then (sim desc, index asc)."""
    xn = x.astype(np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    sims = xn @ xn.T
    n = len(x)
    idx = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        key = sims[i].copy()
        key[i] = np.inf
        order = np.lexsort((np.arange(n), -key))
        idx[i] = order[:k]
    return idx, np.take_along_axis(sims, idx, axis=1)


def test_rv9_six_descriptors():
    torch.manual_seed(0)
    d = torch.randn(6, 4)
    desc = global_descriptors(d[:, None, None, :])  # mean-pool over a 1×1 grid is the identity
    assert isinstance(desc, torch.Tensor) and desc.dtype == torch.float32
    torch.testing.assert_close(desc, torch.nn.functional.normalize(d, dim=1))
    nns = topk_neighbors(desc, 4)
    assert nns.dtype == np.int64 and nns.shape == (6, 4)
    assert (nns[:, 0] == np.arange(6)).all()
    ref, _ = _brute_force(d.numpy(), 4)
    np.testing.assert_array_equal(nns, ref)
    # the values for this seed (cosines computed from torch.manual_seed(0) randn(6, 4))
    np.testing.assert_array_equal(nns, [[0, 5, 1, 2], [1, 5, 3, 4], [2, 4, 1, 3],
                                        [3, 1, 4, 5], [4, 2, 3, 1], [5, 1, 0, 3]])


def test_rv9_feature_map_gap():
    torch.manual_seed(0)
    fmap = torch.randn(2, 5, 3, 3)  # STEGO layout [B,D,h,w]
    expected = torch.nn.functional.normalize(fmap.mean(dim=(2, 3)), dim=1)
    tokens = fmap.permute(0, 2, 3, 1)  # store layout [N,h,w,D]
    torch.testing.assert_close(global_descriptors(tokens), expected)
    got_np = global_descriptors(tokens.numpy().astype(np.float16))
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
    np.testing.assert_allclose(got_np, expected.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got_np, axis=1), 1.0, rtol=1e-6)
    assert (global_descriptors(np.zeros((1, 2, 2, 3))) == 0).all()  # zero stays zero, no NaN
    with pytest.raises(InputError, match=r"\[N,h,w,D\]"):
        global_descriptors(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("block_size", [1, 4, 7, 16, 64, 4096])
def test_blocked_matches_brute_force(block_size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 8)).astype(np.float32)  # 37 is not a multiple of any block size > 1
    ref_idx, ref_sims = _brute_force(x, 6)
    idx, sims = topk_neighbors(x, 6, block_size=block_size, return_similarities=True)
    np.testing.assert_array_equal(idx, ref_idx)
    assert sims.dtype == np.float32
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_k_equal_n_and_errors():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    idx = topk_neighbors(x, 5, block_size=2)
    assert sorted(idx[3].tolist()) == [0, 1, 2, 3, 4] and idx[3, 0] == 3
    with pytest.raises(ConfigError, match="k=6"):
        topk_neighbors(x, 6)
    with pytest.raises(ConfigError, match="k=0"):
        topk_neighbors(x, 0)
    with pytest.raises(ConfigError, match="block_size"):
        topk_neighbors(x, 2, block_size=0)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        topk_neighbors(bad, 2)
    with pytest.raises(InputError, match=r"\[N,D\]"):
        topk_neighbors(x[None], 2)


@pytest.mark.parametrize("block_size", [1, 2, 3, 100])
def test_ties_are_deterministic_and_self_first(block_size):
    # rows 0, 1, 3 are identical; row 4 is orthogonal to them, row 2 is their opposite
    x = np.array([[1, 0], [1, 0], [-1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    idx, sims = topk_neighbors(x, 5, block_size=block_size, return_similarities=True)
    # duplicates: self first, then the other copies in index order, then ties at 0 in index order
    np.testing.assert_array_equal(idx[0], [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(idx[1], [1, 0, 3, 4, 5])
    np.testing.assert_array_equal(idx[3], [3, 0, 1, 4, 5])
    np.testing.assert_array_equal(idx[4], [4, 5, 0, 1, 2])  # cos(row4, row2) = -0.0 ties with +0.0
    np.testing.assert_array_equal(idx[5], [5, 4, 0, 1, 2])
    np.testing.assert_array_equal(idx[2], [2, 4, 5, 0, 1])
    np.testing.assert_array_equal(sims[0], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(sims[2], [1, 0, 0, -1, -1])


@pytest.mark.parametrize("block_size", [5, 7, 16, 64])
def test_many_ties_match_reference_order(block_size):
    # one-hot rows: cosines are exactly 0 or 1, so every row has many exact ties at the k boundary
    cats = np.random.default_rng(6).integers(0, 5, 40)
    x = np.eye(5, dtype=np.float32)[cats]
    np.testing.assert_array_equal(topk_neighbors(x, 8, block_size=block_size), _brute_force(x, 8)[0])


def test_self_forced_when_not_most_similar():
    # zero vector: cosine 0 with everything (including itself) — still column 0
    x = np.array([[0, 0], [1, 0], [1, 1]], dtype=np.float32)
    idx, sims = topk_neighbors(x, 2, block_size=2, return_similarities=True)
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])
    assert sims[0, 0] == 0.0


def test_torch_input_and_device_argument():
    torch.manual_seed(3)
    x = torch.randn(20, 5, dtype=torch.float64)
    np.testing.assert_array_equal(topk_neighbors(x, 3, device="cpu"), _brute_force(x.numpy(), 3)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    np.testing.assert_array_equal(topk_neighbors(x, 7, block_size=64, device="cuda"),
                                  topk_neighbors(x, 7, block_size=64))


def test_npz_roundtrip(tmp_path):
    nns = np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]], dtype=np.int32)
    out = save_nns_npz(tmp_path / "nns_vit_small_potsdam_train_None_224", nns)
    assert out.name == "nns_vit_small_potsdam_train_None_224.npz"
    with np.load(out) as f:
        assert f.files == ["nns"] and f["nns"].dtype == np.int64  # STEGO's key and dtype
    got = load_nns_npz(out, expected_n=3)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, nns)
    sims = np.ones((3, 3), dtype=np.float32)
    out2 = save_nns_npz(tmp_path / "b.npz", nns, similarities=sims)
    with np.load(out2) as f:
        assert sorted(f.files) == ["nns", "similarities"]
    with pytest.raises(InputError, match="3 rows but the dataset has 4"):
        load_nns_npz(out, expected_n=4)
    np.savez_compressed(tmp_path / "wrong.npz", other=nns)
    with pytest.raises(InputError, match="no array 'nns'"):
        load_nns_npz(tmp_path / "wrong.npz")
    with pytest.raises(InputError, match="does not exist"):
        load_nns_npz(tmp_path / "missing.npz")
    with pytest.raises(InputError, match="integer"):
        save_nns_npz(tmp_path / "c.npz", nns.astype(np.float32))


def test_descriptors_from_store(tmp_path):
    rng = np.random.default_rng(5)
    n, grid, dim = 9, (2, 2), 6
    tokens = rng.standard_normal((n, *grid, dim)).astype(np.float32)
    path = tmp_path / "t.zarr"
    create_token_store(path, n=n, grid=grid, dim=dim, label_hw=(4, 4), shard_size=4, with_rgb=False,
                       with_flip=False)
    for k, (a, b) in enumerate(shard_ranges(n, 4)):
        write_shard(path, k, tokens=tokens[a:b], labels=np.zeros((b - a, 4, 4), np.int16),
                    ids=[str(i) for i in range(a, b)])
    got = descriptors_from_store(path, batch_size=3)
    assert got.shape == (n, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, global_descriptors(tokens.astype(np.float16)), atol=1e-6)
    for batch_size, workers in ((4, 0), (2, 3), (100, 1)):  # batches and threads do not change the result
        np.testing.assert_array_equal(descriptors_from_store(path, batch_size=batch_size, workers=workers), got)


@pytest.mark.parametrize("shape", [(5, 28, 28, 384), (3, 7, 5, 6), (0, 2, 2, 4)])
def test_spatial_means_equal_numpys_float16_mean_bit_for_bit(shape):
    tokens = (np.random.default_rng(6).standard_normal(shape) * 3).astype(np.float16)
    got = spatial_means(tokens)
    assert got.dtype == np.float32 and got.shape == (shape[0], shape[3])
    np.testing.assert_array_equal(got, tokens.mean(axis=(1, 2), dtype=np.float32))


@pytest.mark.parametrize("block_size", [64, 100, 4096])
def test_cpu_chunked_selection_matches_brute_force_and_torch_path(block_size):
    # wide enough for the vectorised 64-column chunks of both the row and the column selection (off-diagonal
    # blocks when block_size < N), with exact duplicates and one-hot rows for ties at the k boundary
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    x[100:130] = x[0]
    x[200:260] = np.eye(12, dtype=np.float32)[rng.integers(0, 12, 60)]
    ref_idx, ref_sims = _brute_force(x, 40)
    idx, sims = topk_neighbors(x, 40, block_size=block_size, return_similarities=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    torch_idx, _ = _topk_torch(torch.nn.functional.normalize(torch.from_numpy(x), dim=1), 40, block_size)
    np.testing.assert_array_equal(torch_idx.numpy(), ref_idx)
