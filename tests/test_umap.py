"""UMAP (stages/projections/umap.py): the transform (a token's code is its own, whatever its batch), the saved
form, the RAM guard and backend choice; slow: umap-learn's fit is deterministic for a seed and our transform
equals umap-learn's placement of new points, and the reduce stage runs it end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import stages.plugin  # noqa: F401  (registers stages and methods)
from pipeline.errors import ConfigError
from stages.projections import load_projection
from stages.projections.umap import UMAPProjection, check_umap_memory, umap_backend


def _clusters(n_per: int = 60, d: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, 1.0, (n_per, d)) for c in (0.0, 4.0, 8.0)]).astype(np.float32)


def _hand_made(metric: str = "euclidean") -> UMAPProjection:
    """A fitted-looking UMAP without umap-learn: each cluster's rows embedded around its own 2-D point."""
    x = _clusters()
    embedding = np.repeat(np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], np.float32), 60, axis=0)
    embedding += np.random.default_rng(1).normal(0, 0.1, embedding.shape).astype(np.float32)
    mean = x.mean(0, dtype=np.float64)
    scale = x.std(0, dtype=np.float64)
    return UMAPProjection((x - mean) / scale, embedding, standardize="fit", metric=metric, n_neighbors=10, seed=0,
                          backend="umap-learn", mean=mean, scale=scale)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_codes_are_per_token_and_land_near_their_cluster(metric: str, tmp_path: Path) -> None:
    projection = _hand_made(metric)
    queries = _clusters(n_per=20, seed=2)
    codes = projection.transform(queries)
    one_by_one = np.concatenate([projection.transform(queries[i : i + 1]) for i in range(len(queries))])
    np.testing.assert_allclose(codes, one_by_one, atol=1e-5)  # no batch effect (float rounding only)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    nearest = np.argmin(((codes[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    if metric == "euclidean":
        np.testing.assert_array_equal(nearest, np.repeat([0, 1, 2], 20))
    projection.save(tmp_path / "p")
    again = load_projection(tmp_path / "p")
    assert isinstance(again, UMAPProjection) and again.dim == 2 and again.metric == metric
    np.testing.assert_array_equal(again.transform(queries), codes)
    meta = json.loads((tmp_path / "p" / "projection.json").read_text())
    assert meta["kind"] == "umap" and meta["params"]["n_neighbors"] == 10


def test_guards_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"UMAP on 10000000 tokens × 768 needs about .* GiB .* lower umap.tokens"):
        check_umap_memory(10_000_000, 768, 15, available_bytes=8 * 2**30)
    check_umap_memory(20_000, 768, 15, available_bytes=8 * 2**30)
    if __import__("importlib").util.find_spec("cuml") is None:
        assert umap_backend("auto") == "umap-learn"
        with pytest.raises(ConfigError, match="umap.backend=cuml needs cuML"):
            umap_backend("cuml")


@pytest.mark.slow
def test_fit_is_seeded_and_the_transform_is_umap_learns_placement() -> None:
    umap = pytest.importorskip("umap")
    from umap import umap_

    x, queries = _clusters(), _clusters(n_per=15, seed=3)
    fitted = UMAPProjection.fit(x, 2, 0, standardize="none")
    assert np.array_equal(fitted.embedding, UMAPProjection.fit(x, 2, 0, standardize="none").embedding)
    assert not np.array_equal(fitted.embedding, UMAPProjection.fit(x, 2, 1, standardize="none").embedding)
    reference = umap.UMAP(n_components=2, random_state=0).fit(x)
    np.testing.assert_array_equal(reference.embedding_, fitted.embedding)
    reference.transform_mode = "graph"
    graph = reference.transform(queries).tocsr()
    graph.eliminate_zeros()
    expected = umap_.init_graph_transform(graph, reference.embedding_)
    np.testing.assert_allclose(fitted.transform(queries), expected, atol=1e-4)


@pytest.mark.slow
def test_the_reduce_stage_fits_umap_and_materialises_its_codes(tmp_path: Path) -> None:
    pytest.importorskip("umap")
    from pipeline.config import load_config
    from pipeline.planner import Request, plan
    from pipeline.runner import run_tasks
    from stages.store import open_token_store
    from tests.faults_util import TINY

    cfg = load_config(None, [*TINY, f"run.root={tmp_path}", "projection.method=umap", "projection.dim=3",
                             "umap.tokens=20", "umap.n_neighbors=5"])
    tasks, targets = plan([Request("reduce", cfg)])
    assert tasks[-1].params["umap.backend"] == "umap-learn" and tasks[-1].params["materialize"] is True
    path = {r.id: r.path for r in run_tasks(tasks, cfg.run)}[targets[0]]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["umap"]["n_tokens"] == 20 and manifest["umap"]["backend"] == "umap-learn"
    projection = load_projection(path / "projection")
    train = open_token_store(path / "train.zarr")
    assert isinstance(projection, UMAPProjection) and train.dim == 3 and open_token_store(path / "val.zarr").dim == 3
