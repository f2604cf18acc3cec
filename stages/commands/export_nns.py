"""``stegopipe export-nns``: a knn artifact's neighbours under STEGO's file name."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from pipeline.artifacts import ArtifactStore
from pipeline.cli import register_command
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.paths import LocalPath
from stages.artifacts import KnnArtifact
from stages.stego.knn import load_nns_npz, save_nns_npz


def stego_nns_name(attrs: Mapping[str, Any]) -> str:
    """STEGO's file name for a kNN file, e.g. ``nns_vit_base_cocostuff27_train_five_224.npz``."""
    model = "vit_base" if str(attrs.get("backbone", "")).startswith("vit_base") else "vit_small"
    crop = attrs.get("crop") or "None"
    return f"nns_{model}_{attrs.get('dataset')}_{attrs.get('split', 'train')}_{crop}_{attrs.get('res')}.npz"


@register_command
@click.command("export-nns")
@click.argument("artifact")
@click.argument("directory", type=LocalPath(file_okay=False, path_type=Path))
def export_nns_cmd(artifact: str, directory: Path) -> None:
    """Copy a knn ARTIFACT's neighbours into DIRECTORY under STEGO's nns_*.npz file name."""
    from stages.store import TokensArtifact

    store = ArtifactStore(load_config().run.root)
    knn = KnnArtifact.of(store, store.resolve(artifact))
    if knn.stage != "knn":
        raise InputError(f"{knn.id} is a {knn.stage} artifact, not a knn artifact")
    tokens = TokensArtifact.of(store, knn.input_id("tokens")).store
    directory.mkdir(parents=True, exist_ok=True)
    out = save_nns_npz(directory / stego_nns_name(tokens.attrs), load_nns_npz(knn.nns_path))
    click.echo(str(out))
