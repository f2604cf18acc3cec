"""The ``reduce`` stage (stages/reduce.py) on a tiny synthetic chain; method.md §10.3–10.5, paper Figure 3."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import stages.plugin  # noqa: F401  (registers stages and config sections)
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
from stages.projections import load_projection
from stages.projections.fitdata import (FitRows, fit_moments, fit_parts, read_rows, sample_token_rows, select_fit_rows,
                                        subsample_rows)
from stages.projections.hnne import HNNEProjection
from stages.projections.linear import PCAMoments
from stages.projections.pca import PCAProjection
from stages.projections.rp import RandomProjection
from stages.projections.select import open_projection
from stages.store import open_token_store

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent

# 8 train images at 64 px with a patch-16 random ViT-S: 4×4 tokens each, 128 tokens × 384; shards of 3 samples
TINY = [
    "run.executor=local", "dataset.synthetic.n_train=8", "dataset.synthetic.n_val=4",
    "dataset.synthetic.height=40", "dataset.synthetic.width=48", "backbone.name=vit_small_patch16_224.dino",
    "extract.train_res=64", "extract.val_res=48", "extract.shard_size=3",
]
HNNE = ["projection.method=hnne", "projection.dim=2", "reduce.hnne_tokens=100"]


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact root shared by the module, so the tiny extract runs once."""
    return tmp_path_factory.mktemp("reduce") / "artifacts"


def cfg_of(root: Path, *overrides: str) -> Any:
    return load_config(None, [*TINY, f"run.root={root}", *overrides])


def run_reduce(root: Path, *overrides: str) -> tuple[Path, dict[str, Any]]:
    cfg = cfg_of(root, *overrides)
    tasks, targets = plan([Request("reduce", cfg)])
    results = {r.id: r for r in run_tasks(tasks, cfg.run)}
    path = results[targets[0]].path
    return path, json.loads((path / "manifest.json").read_text())


def train_store(root: Path, *overrides: str) -> Any:
    cfg = cfg_of(root, *overrides)
    tasks, targets = plan([Request("extract", cfg, {"split": "train"})])
    results = {r.id: r for r in run_tasks(tasks, cfg.run)}
    return open_token_store(results[targets[0]].path / "tokens.zarr")


def flat_tokens(store: Any) -> np.ndarray:
    return store.get("tokens", np.arange(store.n)).reshape(-1, store.dim).astype(np.float64)


def test_pca_artifact_equals_sklearn_and_writes_figure3(art: Path) -> None:
    path, manifest = run_reduce(art, "projection.method=pca", "reduce.fit_subset=all")
    x = flat_tokens(train_store(art))
    ref = PCA(svd_solver="full").fit(StandardScaler().fit_transform(x))
    pca = load_projection(path / "projection")
    assert isinstance(pca, PCAProjection) and pca.in_dim == 384 and pca.n_components == 128 == pca.n_samples
    top = 100  # the 128 tokens span 127 dims; the last eigenvalues are rounding noise in both
    np.testing.assert_allclose(pca.explained_variance_ratio[:top], ref.explained_variance_ratio_[:top], rtol=1e-6)
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, atol=1e-12)
    np.testing.assert_allclose(pca.components[:10], ref.components_[:10], atol=1e-6)  # sklearn's signs too
    assert manifest["fit"] == {"subset": "all", "n_samples": 8, "n_tokens": 128, "store_samples": 8}
    assert manifest["moments"]["n_tokens"] == 128 and manifest["dim"] == 128

    evr = json.loads((path / "evr.json").read_text())
    np.testing.assert_allclose(evr["cumulative"], np.cumsum(ref.explained_variance_ratio_), atol=1e-9)
    assert len(evr["interpolated"]["fraction"]) == 384 and evr["interpolated"]["cumulative"][-1] == pytest.approx(1.0)
    assert evr["fraction"][0] == pytest.approx(1 / 384)
    k90 = evr["components_for_evr"]["0.9"]
    assert evr["cumulative"][k90 - 1] >= 0.9 > evr["cumulative"][k90 - 2]
    rows = (path / "evr.csv").read_text().splitlines()
    assert rows[0] == "component,fraction,explained_variance_ratio,cumulative" and len(rows) == 129
    assert (path / "evr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dask_numpy_and_subset_reads_agree(art: Path) -> None:
    store = train_store(art)
    x = flat_tokens(store)
    for fit in ({"subset": "all"}, {"subset": "images", "n": 5, "seed": 3}, {"subset": "tokens", "n": 40, "seed": 1}):
        rows = select_fit_rows(store.n, 16, fit)
        expected_rows = rows.rows if rows.rows is not None else (rows.samples[:, None] * 16 + np.arange(16)).ravel()
        np.testing.assert_array_equal(read_rows(store, rows, chunk_samples=2), x[expected_rows].astype(np.float32))
        ref = PCAMoments.of(x[expected_rows])
        for backend, chunk in (("numpy", 2), ("dask", 2), ("dask", 0), ("numpy", 0)):
            got, used = fit_moments(store, rows, backend, "cpu", chunk)
            assert used == backend and got.count == ref.count
            np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-12)
            np.testing.assert_allclose(got.xtx, ref.xtx, rtol=1e-12)
    images = select_fit_rows(8, 16, {"subset": "images", "n": 5, "seed": 3})
    np.testing.assert_array_equal(images.samples, sample_token_rows(8, 5, 3))
    # backends, chunking and transform batch are runtime settings: the same artifact id
    ids = {plan([Request("reduce", cfg_of(art, "projection.method=pca", *extra))])[1][0]
           for extra in ([], ["reduce.backend=numpy"], ["reduce.backend=dask", "reduce.chunk_samples=2"])}
    assert len(ids) == 1


def test_fit_parts_split_token_rows_by_sample() -> None:
    fit = FitRows(np.array([1, 4, 5]), np.array([17, 20, 64, 79, 80]), 16)
    parts = fit_parts(fit, 2)
    assert [p[0].tolist() for p in parts] == [[1, 4], [5]]
    assert [p[1].tolist() for p in parts] == [[1, 4, 16, 31], [0]]
    sub = subsample_rows(FitRows(np.array([2, 6]), None, 4), 3, seed=0)
    pick = sample_token_rows(8, 3, 0)
    np.testing.assert_array_equal(sub.rows, np.array([2, 6])[pick // 4] * 4 + pick % 4)


def test_sweep_shares_one_pca_fit_and_open_projection_narrows(art: Path) -> None:
    requests = [Request("reduce", cfg_of(art, f"projection.method={m}", f"projection.dim={d}"))
                for m in ("pca", "rp") for d in (2, 4, 8)]
    tasks, targets = plan(requests)
    reduce_ids = [t.id for t in tasks if t.stage == "reduce"]
    assert len(reduce_ids) == 4 and len(set(targets[:3])) == 1 and len(set(targets[3:])) == 3
    path, _ = run_reduce(art, "projection.method=pca", "projection.dim=4")
    full = open_projection(path, 384, None)
    narrow = open_projection(path, 384, 4)
    assert full.dim == 128 and narrow.dim == 4
    tokens = flat_tokens(train_store(art)).astype(np.float32)[:20]
    np.testing.assert_allclose(narrow.transform(tokens), full.transform(tokens)[:, :4], rtol=1e-5, atol=1e-5)


def test_rp_is_seeded_and_uses_fit_moments(art: Path) -> None:
    path, manifest = run_reduce(art, "projection.method=rp", "projection.dim=6", "projection.seed=5")
    rp = load_projection(path / "projection")
    store = train_store(art)
    rows = select_fit_rows(store.n, 16, manifest["fit"])
    ref = RandomProjection.fit(384, 6, 5, standardize="fit", moments=PCAMoments.of(read_rows(store, rows)))
    assert isinstance(rp, RandomProjection) and manifest["seeds"] == {"projection": 5}
    np.testing.assert_array_equal(rp.matrix, ref.matrix)
    tokens = flat_tokens(store)[:20]
    np.testing.assert_allclose(rp.transform(tokens), ref.transform(tokens), rtol=1e-6)
    other, _ = run_reduce(art, "projection.method=rp", "projection.dim=6", "projection.seed=6")
    assert other != path and not np.allclose(load_projection(other / "projection").matrix, rp.matrix)
    raw, raw_manifest = run_reduce(art, "projection.method=rp", "projection.dim=6", "projection.seed=5",
                                   "reduce.standardize=none")
    assert "reduce.fit_subset" not in raw_manifest["params"] and "moments" not in raw_manifest
    raw_rp = load_projection(raw / "projection")
    np.testing.assert_array_equal(raw_rp.matrix, rp.matrix)
    np.testing.assert_allclose(raw_rp.transform(tokens), tokens @ rp.matrix, rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_key(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="projection.dim is required"):
        plan([Request("reduce", cfg_of(art, "projection.method=rp"))])
    with pytest.raises(ConfigError, match="reduce.fit_subset"):
        plan([Request("reduce", cfg_of(art, "projection.method=pca", "reduce.fit_subset=some"))])
    with pytest.raises(ConfigError, match="the reduce stage fits one of"):
        plan([Request("reduce", cfg_of(art, "projection.method=stego"))])
    import stages.projections.hnne

    class LowMemory:
        available = 2**20

    monkeypatch.setattr(stages.projections.hnne.psutil, "virtual_memory", lambda: LowMemory)
    with pytest.raises(ConfigError, match="h-NNE on a subsample of 100 tokens"):
        run_reduce(art, *HNNE, "projection.seed=9")


def check_materialized(path: Path, manifest: dict[str, Any], art: Path) -> None:
    proj = load_projection(path / "projection")
    for split in ("train", "val"):
        cfg = cfg_of(art, *HNNE)
        tasks, targets = plan([Request("extract", cfg, {"split": split})])
        src = open_token_store({r.id: r for r in run_tasks(tasks, cfg.run)}[targets[0]].path / "tokens.zarr")
        dst = open_token_store(path / f"{split}.zarr")
        assert (dst.n, dst.grid, dst.dim, dst.shard_size) == (src.n, src.grid, 2, src.shard_size)
        assert dst.ids == src.ids and dst.arrays == src.arrays
        idx = np.arange(src.n)
        np.testing.assert_array_equal(dst.get_labels(idx), src.get_labels(idx))
        for flip in (False, True) if src.has_flip else (False,):
            codes = proj.transform(src.get_tokens(idx, flip=flip).reshape(-1, 384)).reshape(src.n, *src.grid, 2)
            np.testing.assert_allclose(dst.get_tokens(idx, flip=flip), codes, rtol=2e-3, atol=2e-3)  # float16
        assert dst.attrs["projection"]["kind"] == "hnne" and dst.attrs["dataset"] == src.attrs["dataset"]
        assert manifest["materialized"][split]["n"] == src.n


def test_hnne_fit_follows_the_spec_and_materialises_stores(art: Path) -> None:
    path, manifest = run_reduce(art, *HNNE)
    proj = load_projection(path / "projection")
    store = train_store(art)
    sub = subsample_rows(select_fit_rows(store.n, 16, manifest["fit"]), 100, seed=0)
    ref = HNNEProjection.fit(read_rows(store, sub), dim=2, seed=0, version="v1", metric="cosine")
    assert isinstance(proj, HNNEProjection) and proj.version == "v1" and proj.n_fit == 100
    assert manifest["hnne"]["n_tokens"] == 100 and manifest["params"]["reduce.hnne_tokens"] == 100
    assert set(proj.arrays) == set(ref.arrays)
    for name, arr in ref.arrays.items():
        np.testing.assert_allclose(proj.arrays[name], arr, rtol=1e-12, err_msg=name)
    check_materialized(path, manifest, art)
    assert manifest["shards"] == {"computed": 1 + 2 + 3 + 2, "reused": 0}  # fit, 2 stores, 3 + 2 shards


KILL_AT_SHARD = """
import os, signal, sys
import stages, stages.reduce as reduce
from pipeline.config import load_config
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
calls = []
original = reduce.materialize_shard
def dying(*args):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args)
reduce.materialize_shard = dying
cfg = load_config(None, sys.argv[1:])
run_tasks(plan([Request("reduce", cfg)])[0], cfg.run)
"""


@pytest.mark.slow  # a fresh interpreter imports torch, timm and hnne (5-10 s on a shared machine)
def test_materialisation_resumes_after_kill_9(art: Path) -> None:
    extra = (*HNNE, "reduce.fit_subset=tokens", "reduce.fit_n=110")  # an id no other test builds
    cfg = cfg_of(art, *extra)
    tasks, targets = plan([Request("reduce", cfg)])
    run_tasks([t for t in tasks if t.stage != "reduce"], cfg.run)  # upstream only
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_SHARD, *TINY, f"run.root={art}", *extra],
                          cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (art / "reduce" / targets[0]).exists()
    done = sorted(p.stem for p in (art / ".staging" / targets[0] / ".shards").glob("*.done"))
    assert done == ["fit", "train-00000", "train-00001", "train-store"], done
    path, manifest = run_reduce(art, *extra)
    assert manifest["shards"] == {"computed": 1 + 1 + 2, "reused": 4}  # train shard 2, val store + 2 shards
    assert manifest["materialized"]["train"]["shards_computed"] == 1
    check_materialized(path, manifest, art)


def test_materialisation_resumes_after_a_crash(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process version of the kill test: the fit and finished shards are reused, not recomputed."""
    import stages.reduce as reduce_module

    extra = (*HNNE, "reduce.fit_subset=tokens", "reduce.fit_n=111")
    original, calls = reduce_module.materialize_shard, []

    def crashing(*args: Any) -> int:
        calls.append(args[4])
        if len(calls) == 5:  # train shards 0-2 and val shard 0 done, val shard 1 fails
            raise OSError("disk went away")
        return original(*args)

    monkeypatch.setattr(reduce_module, "materialize_shard", crashing)
    with pytest.raises(Exception, match="disk went away"):
        run_reduce(art, *extra)
    monkeypatch.setattr(reduce_module, "materialize_shard", original)
    fit_mtime = next((art / ".staging").glob("reduce-*/projection/projection.safetensors")).stat().st_mtime_ns
    path, manifest = run_reduce(art, *extra)
    assert manifest["shards"] == {"computed": 1, "reused": 1 + 2 + 3 + 1}  # fit, 2 store creations, shards
    assert manifest["materialized"]["val"]["shards_computed"] == 1
    assert (path / "projection" / "projection.safetensors").stat().st_mtime_ns == fit_mtime  # fit not redone
    check_materialized(path, manifest, art)


def test_materialisation_fans_out_on_a_dask_client(art: Path) -> None:
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"):
        path, manifest = run_reduce(art, *HNNE, "projection.seed=1")
    assert manifest["materialized"]["train"]["parallel"] == "dask"
    check_materialized(path, manifest, art)
