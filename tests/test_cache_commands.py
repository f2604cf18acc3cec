"""The cache's CLI commands on a real tiny chain: knn stage + export-nns, export-squirrel / import-squirrel."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pipeline.artifacts import ArtifactStore
from pipeline.cli import main
from stages.stego.knn import load_nns_npz
from stages.store import open_token_store

TINY = ["dataset.synthetic.n_train=6", "dataset.synthetic.n_val=2", "dataset.synthetic.height=40",
        "dataset.synthetic.width=48", "backbone.name=vit_small_patch16_224.dino", "extract.train_res=32",
        "extract.val_res=48", "knn.k=30", "run.executor=local"]


def _invoke(*args: str) -> object:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_knn_stage_and_stego_file_export(root: Path, tmp_path: Path) -> None:
    knn_path = Path(_invoke("run", "knn", *TINY).stdout.strip().splitlines()[-1])
    nns = load_nns_npz(knn_path / "nns.npz")
    assert nns.shape == (6, 6) and (nns[:, 0] == np.arange(6)).all()  # k clamped to N, self first
    manifest = ArtifactStore(root).manifest(knn_path.name)
    assert manifest["counts"] == {"samples": 6, "k": 6} and "exceeds" in manifest["notes"][0]
    out = _invoke("export-nns", knn_path.name, str(tmp_path / "nns")).stdout.strip()
    assert re.search(r"nns_vit_small_synthetic_train_None_32\.npz$", out)
    assert (load_nns_npz(out) == nns).all()


def test_squirrel_export_import_round_trip(root: Path, tmp_path: Path) -> None:
    tokens_path = Path(_invoke("run", "extract", *TINY, "split=val").stdout.strip().splitlines()[-1])
    url = str(tmp_path / "squirrel")
    assert "2 samples" in _invoke("export-squirrel", tokens_path.name, url).stdout
    imported = Path(_invoke("import-squirrel", url, "--attr", "backbone=vit_small_patch16_224.dino").stdout.strip())
    assert imported.parent.name == "extract" and ArtifactStore(root).verify(imported.name) == []
    source, back = open_token_store(tokens_path / "tokens.zarr"), open_token_store(imported / "tokens.zarr")
    assert back.n == source.n and back.ids == source.ids
    np.testing.assert_array_equal(back.get_tokens([0, 1]), source.get_tokens([0, 1]))
    np.testing.assert_array_equal(back.get_labels([0, 1]), source.get_labels([0, 1]))
    again = _invoke("import-squirrel", url, "--attr", "backbone=vit_small_patch16_224.dino").stdout.strip()
    assert Path(again) == imported  # content-addressed: the same store imports to the same artifact
