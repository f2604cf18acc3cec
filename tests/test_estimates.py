"""plan's time estimates (pipeline/estimates.py): cost models (start-up + rate) fitted from manifests on
the root, the calibration file, registered work models and kinds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import estimates
from pipeline.artifacts import MANIFEST, ArtifactStore, artifact_id, manifest_checksum


def _publish(root: Path, stage: str, params: dict[str, Any], inputs: dict[str, str], size: int, wall: float,
             **extras: Any) -> str:
    artifact = artifact_id(stage, "1", params, inputs)
    folder = root / stage / artifact
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"\0" * size)
    manifest = {"id": artifact, "stage": stage, "params": params, "inputs": inputs, "wall_time_s": wall,
                "files": [{"path": "data.bin", "size": size, "sha256": "0" * 64}], **extras}
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return artifact


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    estimates._root_points.cache_clear()
    monkeypatch.setattr(estimates, "_BYTES", {})
    monkeypatch.setattr(estimates, "WORK", {})
    monkeypatch.setattr(estimates, "KINDS", {})
    monkeypatch.setattr(estimates, "PHASES", {})
    yield
    estimates._root_points.cache_clear()


def test_rate_from_root_manifests_and_chained_byte_estimates(tmp_path):
    tokens = _publish(tmp_path, "tok", {"n": 1}, {}, size=1000, wall=1.0)
    _publish(tmp_path, "fit", {"n": 1}, {"tokens": tokens}, size=10, wall=2.0)  # 1000 bytes in 2 s: 500 B/s
    store = ArtifactStore(tmp_path)
    # a bigger token store, still missing: its bytes estimate feeds the estimate of its consumer
    seconds, basis = estimates.estimate_seconds(store, "fit", "fit-0000000000000002", {}, {"tokens": "tok-00000000000000bb"}, None)
    assert seconds is None  # tok-big's size is unknown until plan has seen it
    tok_s, _ = estimates.estimate_seconds(store, "tok", "tok-00000000000000bb", {}, {}, 4000)
    assert tok_s == pytest.approx(4.0)  # the tok stage: 1000 B/s
    seconds, basis = estimates.estimate_seconds(store, "fit", "fit-0000000000000002", {}, {"tokens": "tok-00000000000000bb"}, None)
    assert (seconds, basis) == (pytest.approx(8.0), "root")


def test_registered_work_model_and_calibration_fallback(tmp_path):
    estimates.register_work("pairs", lambda params, inp, out: float(inp) ** 2)
    store = ArtifactStore(tmp_path)
    tokens = _publish(tmp_path, "tok", {"n": 1}, {}, size=100, wall=1.0)
    assert estimates.estimate_seconds(store, "pairs", "pairs-0000000000000001", {}, {"tokens": tokens}, None) == (None, None)
    (tmp_path / estimates.CALIBRATION_FILE).write_text(
        json.dumps({"models": {"pairs": {"startup_s": 0.0, "per_s": 1000.0}}}))
    seconds, basis = estimates.estimate_seconds(store, "pairs", "pairs-0000000000000001", {}, {"tokens": tokens}, None)
    assert (seconds, basis) == (pytest.approx(10.0), "calibration")  # 100² work at 1000/s
    _publish(tmp_path, "pairs", {"n": 1}, {"tokens": tokens}, size=1, wall=5.0)  # measured on the root: 2000/s
    estimates._root_points.cache_clear()
    seconds, basis = estimates.estimate_seconds(store, "pairs", "pairs-0000000000000001", {}, {"tokens": tokens}, None)
    assert (seconds, basis) == (pytest.approx(5.0), "root")


def test_artifacts_whose_inputs_are_gone_do_not_count(tmp_path):
    tokens = _publish(tmp_path, "tok", {"n": 1}, {}, size=1000, wall=1.0)
    _publish(tmp_path, "fit", {"n": 1}, {"tokens": tokens}, size=10, wall=2.0)
    import shutil

    shutil.rmtree(tmp_path / "tok" / tokens)
    assert estimates.model(ArtifactStore(tmp_path), "fit", {}) == (None, None)


def test_stage_cost_models():
    import importlib

    from stages import costs

    importlib.reload(costs)  # registers knn, train-head and probe into the fixture's empty registry
    assert estimates.work_of("knn", {}, 3, None) == 9.0
    assert estimates.work_of("train-head", {"head.steps": 10, "head.batch_size": 8}, 5, None) == 80.0
    assert estimates.work_of("probe", {"probe.steps": 4, "probe.batch_size": 2}, 5, None) == 8.0
    assert estimates.work_of("reduce", {}, 7, 3) == 7.0
    assert estimates.model_key("reduce", {"projection.method": "hnne"}) == "reduce/hnne"
    assert estimates.model_key("knn", {"knn.k": 7}) == "knn"


def test_startup_fitted_from_two_sizes_predicts_the_next(tmp_path):
    """A stage costing 20 s of set-up plus 1 s per 100 bytes, run at 1000 and 2000 bytes: the estimate at
    4000 is 60 s (a rate alone, from the manifests, said 48 or 53 s)."""
    store = ArtifactStore(tmp_path)
    for n in (1000, 2000):
        tokens = _publish(tmp_path, "tok", {"n": n}, {}, size=n, wall=1.0)
        _publish(tmp_path, "fit", {"n": n}, {"tokens": tokens}, size=1, wall=20.0 + n / 100)
    estimates.estimate_seconds(store, "tok", "tok-00000000000000cc", {}, {}, 4000)
    seconds, basis = estimates.estimate_seconds(store, "fit", "fit-00000000000000cc", {}, {"tokens": "tok-00000000000000cc"}, None)
    assert (seconds, basis) == (pytest.approx(60.0), "root")
    assert estimates.model(store, "fit", {}) == (estimates.CostModel(pytest.approx(20.0), pytest.approx(100.0)), "root")


def _knn_like(tmp_path: Path, sizes: tuple[int, ...]) -> ArtifactStore:
    """A stage reading its input at 1000 B/s, then searching at 1 s per 10⁶ (bytes²), plus 3 s of start-up,
    published at ``sizes`` bytes with its phase times."""
    estimates.register_work("pairs", lambda params, inp, out: float(inp) ** 2)
    estimates.register_phases("pairs", {"read": estimates.default_work, "search": lambda p, inp, out: float(inp) ** 2})
    for n in sizes:
        tokens = _publish(tmp_path, "tok", {"n": n}, {}, size=n, wall=1.0)
        read, search = n / 1000, n * n / 1e6
        _publish(tmp_path, "pairs", {"n": n}, {"tokens": tokens}, size=1, wall=3.0 + read + search,
                 phase_seconds={"read": read, "search": search})
    return ArtifactStore(tmp_path)


def test_phases_are_modelled_apart_and_summed(tmp_path):
    """Mostly reading at the measured sizes, mostly searching at the estimated one: one quadratic line
    through the walls (5 s, 9 s) takes the reads for search and says 137 s at 10,000 bytes; the phases
    say the true 3 + 10 + 100 = 113 s."""
    store = _knn_like(tmp_path, (1000, 2000))
    estimates.estimate_seconds(store, "tok", "tok-0000000000000a00", {}, {}, 10_000)
    seconds, basis = estimates.estimate_seconds(store, "pairs", "pairs-000000000000a000", {},
                                                {"tokens": "tok-0000000000000a00"}, None)
    assert (seconds, basis) == (pytest.approx(3.0 + 10.0 + 100.0), "root")
    single, _ = estimates.model(store, "pairs", {})  # the stage's single model, from the walls alone
    assert single.seconds(10_000.0 ** 2) == pytest.approx(137.0)


def test_phases_fall_back_to_the_single_model_and_feed_the_calibration(tmp_path):
    store = _knn_like(tmp_path, (1000, 2000))
    models = estimates.models_of(store, ["pairs"])
    assert set(models) == {"pairs", "pairs:read", "pairs:search", "pairs:rest"}
    assert models["pairs:rest"]["startup_s"] + 1 / models["pairs:rest"]["per_s"] == pytest.approx(3.0)
    bare = tmp_path / "bare"  # manifests without phase times: the single model
    tokens = _publish(bare, "tok", {"n": 1}, {}, size=1000, wall=1.0)
    _publish(bare, "pairs", {"n": 1}, {"tokens": tokens}, size=1, wall=5.0)
    seconds, basis = estimates.estimate_seconds(ArtifactStore(bare), "pairs", "pairs-0000000000000001", {},
                                                {"tokens": tokens}, None)
    assert (seconds, basis) == (pytest.approx(5.0), "root")
    (bare / estimates.CALIBRATION_FILE).write_text(json.dumps({"models": models}))  # now every phase has a model
    estimates._root_points.cache_clear()
    seconds, basis = estimates.estimate_seconds(ArtifactStore(bare), "pairs", "pairs-0000000000000001", {},
                                                {"tokens": tokens}, None)
    assert (seconds, basis) == (pytest.approx(3.0 + 1.0 + 1.0), "calibration")
    with pytest.raises(ValueError, match="reserved"):
        estimates.register_phases("x", {"rest": estimates.default_work})


def test_fit_cost_edge_cases():
    fit = estimates.fit_cost
    assert fit([]) is None
    assert fit([(100, 10.0), (200, 9.0)]) == estimates.CostModel(9.5, None)  # no growth: a fixed time
    assert fit([(100, 1.0), (200, 4.0)]) == estimates.CostModel(0.0, pytest.approx(75.0))  # intercept < 0: median rate
    assert fit([(100, 10.0), (110, 12.0)]) == estimates.CostModel(0.0, pytest.approx((10 + 110 / 12) / 2))  # one size: median rate
    # one size with a calibrated start-up: the rate is of the time after it; the start-up stays below the wall
    assert fit([(100, 10.0)], startup_s=5.0) == estimates.CostModel(5.0, pytest.approx(20.0))
    assert fit([(100, 10.0)], startup_s=50.0).startup_s == pytest.approx(9.0)
    assert estimates.CostModel(9.5, None).seconds(1e9) == 9.5


def test_kinds_get_models_of_their_own_and_calibration_gives_the_startup(tmp_path):
    estimates.register_work("red", estimates.default_work, kind=lambda params: params["method"])
    store = ArtifactStore(tmp_path)
    tokens = _publish(tmp_path, "tok", {"n": 1}, {}, size=1000, wall=1.0)
    _publish(tmp_path, "red", {"method": "slow"}, {"tokens": tokens}, size=1, wall=100.0)
    _publish(tmp_path, "red", {"method": "fast"}, {"tokens": tokens}, size=1, wall=1.0)
    slow, _ = estimates.estimate_seconds(store, "red", "red-0000000000000001", {"method": "slow"}, {"tokens": tokens}, None)
    fast, _ = estimates.estimate_seconds(store, "red", "red-0000000000000002", {"method": "fast"}, {"tokens": tokens}, None)
    assert (slow, fast) == (pytest.approx(100.0), pytest.approx(1.0))  # the median rate of both said 2 s each
    (tmp_path / estimates.CALIBRATION_FILE).write_text(
        json.dumps({"models": {"red/slow": {"startup_s": 60.0, "per_s": 1.0}}}))
    big = _publish(tmp_path, "tok", {"n": 2}, {}, size=2000, wall=1.0)
    estimates._root_points.cache_clear()
    slow2, basis = estimates.estimate_seconds(store, "red", "red-0000000000000003", {"method": "slow"}, {"tokens": big}, None)
    assert (slow2, basis) == (pytest.approx(60.0 + 2 * 40.0), "root")  # 40 s of the 100 were work, 60 start-up


def test_plan_sizes_tokens_of_a_folder_dataset_before_prepare_ran(root, tmp_path):
    """Before its index exists, extract's byte estimate counts what the reader lists on disk (the rest of the
    DAG's estimates chain from it); before this it had none."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from pipeline.cli import main

    data = tmp_path / "mine"
    (data / "imgs" / "train").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 40, 3), 40 * i, np.uint8)).save(data / "imgs" / "train" / f"img{i}.png")
    result = CliRunner().invoke(main, ["plan", "extract", "--preset", "folder", f"dataset.root={data}",
                                       "extract.train_res=64", "--json"], catch_exceptions=False)
    rows = {r["stage"]: r for r in json.loads(result.output)["rows"]}
    assert rows["prepare"]["status"] == "missing"
    assert rows["extract"]["estimate"]["bytes"] == 3 * 8 * 8 * 384 * 2  # 3 images × 8×8 tokens × 384 × fp16
