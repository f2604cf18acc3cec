"""``stegopipe export-squirrel`` / ``import-squirrel``: tokens artifacts to and from stego-studies'
Squirrel stores (the format: :mod:`stages.store.squirrel`)."""
from __future__ import annotations

from typing import Any

import click
import fsspec
import zarr

from pipeline.artifacts import ArtifactStore
from pipeline.cli import register_command
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.executor import import_artifact
from stages.store import TokensArtifact, open_token_store
from stages.store.squirrel import SQUIRREL_SHARD_SIZE, export_squirrel, import_squirrel


@register_command
@click.command("export-squirrel")
@click.argument("artifact")
@click.argument("url")
@click.option("--shard-size", default=SQUIRREL_SHARD_SIZE, show_default=True, help="Samples per Squirrel shard.")
def export_squirrel_cmd(artifact: str, url: str, shard_size: int) -> None:
    """Write a tokens ARTIFACT as a stego-studies Squirrel store at URL (folder or fsspec URL)."""
    store = ArtifactStore(load_config().run.root)
    artifact = store.resolve(artifact)
    if store.manifest(artifact).get("kind") != "tokens":
        raise InputError(f"{artifact} is not a tokens artifact")
    result = export_squirrel(TokensArtifact(store.path(artifact)).store_path, url, shard_size=shard_size)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{result.n} samples in {result.shards} shards at {result.url}")


@register_command
@click.command("import-squirrel")
@click.argument("url")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="Store attribute to set when the source has none (backbone, dataset, split, res, ...).")
def import_squirrel_cmd(url: str, attrs: tuple[str, ...]) -> None:
    """Turn the Squirrel store at URL into a tokens artifact (content-addressed by the store's files)."""
    root = load_config().run.root
    fs, path = fsspec.core.url_to_fs(url)
    listing = sorted((info["name"], info.get("size")) for info in fs.ls(path, detail=True))
    extra = dict(a.split("=", 1) for a in attrs if "=" in a)
    params = {"squirrel": url, "files": listing, "attrs": extra}

    def write(ctx: Any) -> None:
        dest = import_squirrel(url, TokensArtifact(ctx.out).store_path)
        group = zarr.open_group(dest, mode="r+")
        for key, value in extra.items():
            group.attrs.setdefault(key, value)
        ctx.record(counts={"samples": open_token_store(dest).n}, source=url)

    result = import_artifact(root, stage="extract", kind="tokens", format_version="squirrel-import-2", params=params,
                             write=write, description="imported Squirrel store")
    click.echo(str(result.path))
