"""Typed artifact readers (pipeline.artifacts.ArtifactView, stages.artifacts): manifest fields, the
kind's files, and one clear error naming the file or artifact when something is missing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.artifacts import MANIFEST, ArtifactStore, ArtifactView, seal_manifest
from pipeline.errors import ArtifactError, MissingArtifactError
from stages.artifacts import EvalArtifact, HeadArtifact, KnnArtifact, ProbesArtifact, ReduceArtifact
from stages.store import TokensArtifact


def _publish(store: ArtifactStore, artifact: str, manifest: dict, files: dict[str, object] | None = None) -> Path:
    path = store.path(artifact)
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps(seal_manifest({"stage": artifact.rsplit("-", 1)[0], **manifest})))
    for name, data in (files or {}).items():
        (path / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_view_reads_params_lineage_and_names_what_is_missing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    _publish(store, "knn-0123456789abcdef", {"params": {"k": 7}, "inputs": {"tokens": "extract-00000000000000aa"}})
    knn = KnnArtifact.of(store, "knn-0123456789abcdef")
    assert (knn.id, knn.stage, knn.params) == ("knn-0123456789abcdef", "knn", {"k": 7})
    assert knn.input_id("tokens") == "extract-00000000000000aa"
    assert knn.nns_path == store.path(knn.id) / "nns.npz"
    with pytest.raises(ArtifactError, match=r"knn-0123456789abcdef: its manifest records no 'val' input \(inputs: tokens\)"):
        knn.input_id("val")
    with pytest.raises(MissingArtifactError, match="knn-ffffffffffffffff"):
        KnnArtifact.of(store, "knn-ffffffffffffffff")
    assert isinstance(TokensArtifact(store.path(knn.id)), ArtifactView)


def test_eval_metrics_checked_and_named(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    good = {"protocol": {"probe_id": "probe-1"}, "scores": {"cluster": {"assignment": [1, 0]}}}
    _publish(store, "evaluate-00000000000000a1", {}, {EvalArtifact.METRICS: good})
    _publish(store, "evaluate-00000000000000a2", {}, {EvalArtifact.METRICS: {"scores": {}}})
    _publish(store, "evaluate-00000000000000a3", {}, {EvalArtifact.METRICS: "{not json"})
    ok = EvalArtifact.of(store, "evaluate-00000000000000a1")
    assert ok.protocol == good["protocol"] and ok.scores == good["scores"]
    with pytest.raises(ArtifactError, match=r"evaluate-00000000000000a2/metrics\.json: expected an object with 'protocol'"):
        EvalArtifact.of(store, "evaluate-00000000000000a2").protocol
    with pytest.raises(ArtifactError, match=r"evaluate-00000000000000a3/metrics\.json: unreadable"):
        EvalArtifact.of(store, "evaluate-00000000000000a3").metrics


def test_kind_files(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    _publish(store, "reduce-00000000000000b1", {"inputs": {"tokens": "extract-0000000000000001"}}, {ReduceArtifact.EVR: {"evr": [0.5]}})
    _publish(store, "reduce-00000000000000b2", {})
    assert ReduceArtifact.of(store, "reduce-00000000000000b1").evr == {"evr": [0.5]}
    assert ReduceArtifact.of(store, "reduce-00000000000000b2").evr is None
    _publish(store, "probe-00000000000000c1", {"params": {"seed": 3}, "inputs": {"projection": "train-head-0000000000000001"}})
    probes = ProbesArtifact.of(store, "probe-00000000000000c1")
    assert (probes.probes_dir, probes.projection_id, probes.params["seed"]) == (probes.path, "train-head-0000000000000001", 3)
    _publish(store, "train-head-00000000000000d1", {})
    assert HeadArtifact.of(store, "train-head-00000000000000d1").probes_dir.name == HeadArtifact.PROBES
