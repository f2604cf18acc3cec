"""plan's time estimates (pipeline/estimates.py): rates from manifests on the root, the calibration file,
registered work models, and the TIME column of `stegopipe plan`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import estimates
from pipeline.artifacts import MANIFEST, ArtifactStore, artifact_id, manifest_checksum


def _publish(root: Path, stage: str, params: dict[str, Any], inputs: dict[str, str], size: int, wall: float) -> str:
    artifact = artifact_id(stage, "1", params, inputs)
    folder = root / stage / artifact
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"\0" * size)
    manifest = {"id": artifact, "stage": stage, "params": params, "inputs": inputs, "wall_time_s": wall,
                "files": [{"path": "data.bin", "size": size, "sha256": "0" * 64}]}
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return artifact


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    estimates._root_rates.cache_clear()
    monkeypatch.setattr(estimates, "_BYTES", {})
    monkeypatch.setattr(estimates, "WORK", {})
    yield
    estimates._root_rates.cache_clear()


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
    (tmp_path / estimates.CALIBRATION_FILE).write_text(json.dumps({"rates": {"pairs": 1000.0}}))
    seconds, basis = estimates.estimate_seconds(store, "pairs", "pairs-0000000000000001", {}, {"tokens": tokens}, None)
    assert (seconds, basis) == (pytest.approx(10.0), "calibration")  # 100² work at 1000/s
    _publish(tmp_path, "pairs", {"n": 1}, {"tokens": tokens}, size=1, wall=5.0)  # measured on the root: 2000/s
    estimates._root_rates.cache_clear()
    seconds, basis = estimates.estimate_seconds(store, "pairs", "pairs-0000000000000001", {}, {"tokens": tokens}, None)
    assert (seconds, basis) == (pytest.approx(5.0), "root")


def test_artifacts_whose_inputs_are_gone_do_not_count(tmp_path):
    tokens = _publish(tmp_path, "tok", {"n": 1}, {}, size=1000, wall=1.0)
    _publish(tmp_path, "fit", {"n": 1}, {"tokens": tokens}, size=10, wall=2.0)
    import shutil

    shutil.rmtree(tmp_path / "tok" / tokens)
    assert estimates.rate(ArtifactStore(tmp_path), "fit") == (None, None)


def test_stage_cost_models():
    import importlib

    from stages import costs

    importlib.reload(costs)  # registers knn, train-head and probe into the fixture's empty registry
    assert estimates.work_of("knn", {}, 3, None) == 9.0
    assert estimates.work_of("train-head", {"head.steps": 10, "head.batch_size": 8}, 5, None) == 80.0
    assert estimates.work_of("probe", {"probe.steps": 4, "probe.batch_size": 2}, 5, None) == 8.0
    assert estimates.work_of("reduce", {}, 7, 3) == 7.0
