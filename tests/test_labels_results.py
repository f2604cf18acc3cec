"""Artifact labels (params + lineage) and `stegopipe results` / `experiments` / `ls` / `show` with them,
on a root of fake manifests shaped like the real stages' (no stage runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import stages.plugin  # noqa: F401  (label fields and result names)
from pipeline import results
from pipeline.artifacts import MANIFEST, ArtifactStore, artifact_id, manifest_checksum
from pipeline.cli import main
from pipeline.labels import Labeller, distinguishing, label_text, manifest_reader, store_lookup


def _publish(root: Path, stage: str, params: dict[str, Any], inputs: dict[str, str],
             summary: dict[str, Any] | None = None) -> str:
    artifact = artifact_id(stage, "1", params, inputs)
    folder = root / stage / artifact
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"id": artifact, "stage": stage, "version": "1", "kind": stage, "params": params,
                                "inputs": inputs, "files": [], "created": "2026-12-03T08:00:00", "wall_time_s": 1.0}
    if summary is not None:
        manifest["summary"] = summary
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return artifact


def _scores(base: float) -> dict[str, dict[str, float]]:
    return {entry: {"miou": base + shift, "accuracy": base + 20 + shift}
            for entry, shift in (("linear", 10.0), ("cluster", 0.0), ("linear_crf", 12.0), ("cluster_crf", 2.0))}


def fake_root(root: Path, methods: tuple[str, ...] = ("identity", "pca", "rp"), dims: tuple[int, ...] = (4, 16),
              seeds: tuple[int, ...] = (0, 1), datasets: tuple[str, ...] = ("synthetic",)) -> list[str]:
    """A root shaped like the demo's: prepare/extract per split, probes and evaluations per method, dim and
    seed (evaluate summaries = 10 * seed + dim, so means and stds are known). Returns the evaluate ids."""
    evaluations = []
    for dataset in datasets:
        tokens = {}
        for split, res in (("train", 64), ("val", 96)):
            index = _publish(root, "prepare", {"dataset.name": dataset, "split": split}, {})
            tokens[split] = _publish(root, "extract", {"backbone.name": "vit_small_patch8_224.dino",
                                                       f"extract.{split}_res": res, "split": split,
                                                       "weights_tag": "random-seed0"}, {"index": index})
        for method in methods:
            for dim in ((None,) if method == "identity" else dims):
                for seed in seeds:
                    probe = _publish(root, "probe", {"projection.method": method, "projection.dim": dim,
                                                     "projection.seed": seed, "probe.lr": 0.005},
                                     {"tokens": tokens["train"]})
                    evaluations.append(_publish(
                        root, "evaluate", {"projection.method": method, "projection.dim": dim, "projection.seed": seed,
                                           "evaluate.crf": True},
                        {"probes": probe, "tokens": tokens["val"]}, _scores(10.0 * seed + (dim or 0))))
    return evaluations


def _invoke(root: Path, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env={"STEGOPIPE_ROOT": str(root)}, catch_exceptions=False)


def test_labels_inherit_from_the_lineage_and_keep_local_fields_local(tmp_path: Path) -> None:
    evaluation = fake_root(tmp_path, methods=("pca",), dims=(16,), seeds=(1,))[0]
    store = ArtifactStore(tmp_path)
    labels = Labeller(store_lookup(store))
    fields = labels.fields(evaluation)
    # dataset from prepare, backbone from extract, method/dim/seed from the probe, CRF its own
    assert fields == {"dataset": "synthetic", "backbone": "ViT-S/8 random", "method": "pca", "dim": 16, "seed": 1,
                      "crf": True}
    assert labels.text(evaluation) == "synthetic ViT-S/8 random PCA d=16 seed=1 CRF"
    extract = store.manifest(evaluation)["inputs"]["tokens"]
    assert labels.fields(extract)["split"] == "val" and labels.fields(extract)["res"] == 96  # local ones


def test_inputs_that_disagree_leave_a_field_out() -> None:
    records = {"a-1": ("prepare", {"dataset.name": "x", "split": "train"}, {}),
               "b-1": ("prepare", {"dataset.name": "y", "split": "train"}, {}),
               "c-1": ("report", {"experiment": "e"}, {"one": "a-1", "two": "b-1"})}
    labels = Labeller(records.get)
    assert labels.fields("c-1") == {"experiment": "e"}
    assert labels.fields("gone-1") == {}  # unknown ids add nothing


def test_distinguishing_names_the_params_that_differ_only_for_equal_labels() -> None:
    extra = distinguishing(["a", "a", "b"], [{"lr": 1, "k": 2}, {"lr": 3, "k": 2}, {"lr": 9}])
    assert extra == ["lr=1", "lr=3", ""]


def test_results_pool_seeds_into_mean_std_and_render_every_format(tmp_path: Path) -> None:
    evaluations = fake_root(tmp_path)
    store = ArtifactStore(tmp_path)
    labels = Labeller(store_lookup(store))
    rows = results.artifact_rows(manifest_reader(store), evaluations, labels)
    assert len(rows) == len(evaluations) == 10
    pooled = results.sort(results.aggregate(rows, labels), "cluster_miou")
    assert [r.n for r in pooled] == [2] * 5
    best = pooled[0]  # dim 16: cluster mIoU 16 (seed 0) and 26 (seed 1)
    assert best.label["dim"] == 16  # pca and rp score alike here
    assert best.mean_std("cluster_miou") == pytest.approx((21.0, 5.0))
    assert best.cell("cluster_miou") == "21.0 ± 5.0"
    assert results.Row(["x"], {}, {"m": [3.0]}).cell("m") == "3.0"  # one value: no "± 0.0"
    table = results.render(pooled, "table", per_artifact=False)
    assert table.splitlines()[0].split()[:6] == ["dataset", "backbone", "method", "dim", "crf", "n"]
    assert "cluster+CRF mIoU" in table
    md = results.render(pooled, "md", per_artifact=False)
    assert md.splitlines()[1].startswith("| --- |") and "| PCA | 16 |" in md
    parsed = json.loads(results.render(pooled, "json", per_artifact=False))
    assert parsed[0]["mean"]["cluster_miou"] == 21.0 and parsed[0]["std"]["cluster_miou"] == 5.0
    csv_lines = results.render(pooled, "csv", per_artifact=False).splitlines()
    assert csv_lines[0].startswith("ids,dataset,backbone,method,dim,crf,config,n,linear_miou,linear_miou_std")
    assert len(csv_lines) == 6


def test_where_and_sort_reject_unknown_keys(tmp_path: Path) -> None:
    fake_root(tmp_path)
    only = _invoke(tmp_path, "results", "--where", "method=rp", "--where", "dim=4", "--format", "json")
    assert only.exit_code == 0 and {tuple(r["label"][k] for k in ("method", "dim")) for r in json.loads(only.stdout)} \
        == {("rp", 4)}
    shown = _invoke(tmp_path, "results", "--where", "method=PCA")  # the displayed name works too
    assert shown.stdout.count("PCA") == 4
    bad = _invoke(tmp_path, "results", "--where", "metod=pca")
    assert bad.exit_code == 2 and "did you mean method" in bad.stderr
    bad_sort = _invoke(tmp_path, "results", "--sort", "miou")
    assert bad_sort.exit_code == 2 and "cluster_miou" in bad_sort.stderr


def test_results_cli_lists_each_evaluation_with_its_label(tmp_path: Path) -> None:
    evaluations = fake_root(tmp_path, methods=("identity", "rp"), dims=(4,), seeds=(0, 1))
    out = _invoke(tmp_path, "results", "--sort", "linear_miou").stdout.splitlines()
    assert len(out) == 1 + len(evaluations)
    assert out[1].split()[:7] == [out[1].split()[0], "synthetic", "ViT-S/8", "random", "RP", "4", "1"]  # best first
    assert out[0].split()[0] == "id"


def test_ls_and_show_show_labels(tmp_path: Path) -> None:
    evaluation = fake_root(tmp_path, methods=("rp",), dims=(4,), seeds=(0, 1))[0]
    listing = _invoke(tmp_path, "ls", "evaluate").stdout.splitlines()
    assert listing[0].split()[:8] == ["ID", "CREATED", "WALL", "SIZE", "DATASET", "BACKBONE", "METHOD", "DIM"]
    assert {line.split()[-2] for line in listing[1:]} == {"0", "1"}  # the seeds tell the rows apart
    everything = _invoke(tmp_path, "ls").output
    assert "synthetic val ViT-S/8 random 96px" in everything
    shown = _invoke(tmp_path, "show", evaluation).output
    assert "label      synthetic ViT-S/8 random RP d=4 seed=0 CRF" in shown
    rows = json.loads(_invoke(tmp_path, "ls", "--json").stdout)
    assert {r["label_fields"].get("seed") for r in rows if r["stage"] == "evaluate"} == {0, 1}


def test_ls_tells_equal_labels_apart_by_the_params_that_differ(tmp_path: Path) -> None:
    tokens = _publish(tmp_path, "extract", {"backbone.name": "vit_small_patch8_224.dino", "split": "train"}, {})
    for lr in (0.1, 0.2):
        _publish(tmp_path, "probe", {"projection.method": "pca", "projection.dim": 4, "projection.seed": 0,
                                     "probe.lr": lr}, {"tokens": tokens})
    listing = _invoke(tmp_path, "ls", "probe").output
    assert "[probe.lr=0.1]" in listing and "[probe.lr=0.2]" in listing
    assert label_text({"method": "pca", "crf": False}) == "PCA"


def test_manifests_of_the_older_params_layout_keep_their_labels() -> None:
    records = {"prepare-1": ("prepare", {"dataset": "potsdam", "split": "train"}, {}),
               "extract-1": ("extract", {"backbone": "vit_base_patch8_224.dino", "res": 224, "split": "train",
                                         "weights_tag": "dino:abc"}, {"index": "prepare-1"}),
               "reduce-1": ("reduce", {"method": "rp", "dim": 8, "seed": 3}, {"tokens": "extract-1"})}
    assert Labeller(records.get).text("reduce-1") == "potsdam ViT-B/8 RP d=8 seed=3"
