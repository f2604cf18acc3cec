"""``stegopipe export-tokens`` / ``import-tokens``: tokens artifacts to and from object storage (s3://, gs://,
any fsspec URL), same id and bytes both ways (:mod:`stages.store.remote`)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from pipeline.artifacts import ArtifactStore
from pipeline.cli import human_bytes, register_command
from pipeline.config import load_config
from pipeline.errors import InputError
from stages.store import TokensArtifact
from stages.store.remote import export_tokens, import_tokens


@contextmanager
def _named(url: str) -> Iterator[None]:
    """An error of the storage library (no bucket, no credentials, access denied) as one line naming ``url``."""
    try:
        yield
    except (OSError, ValueError) as exc:
        hint = (" (credentials and endpoint come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                "or ~/.aws, AWS_ENDPOINT_URL)" if url.startswith("s3://") else "")
        raise InputError(f"{url}: {type(exc).__name__}: {exc}{hint}") from exc


@register_command
@click.command("export-tokens")
@click.argument("artifact")
@click.argument("url")
def export_tokens_cmd(artifact: str, url: str) -> None:
    """Write a tokens ARTIFACT (its Zarr store, log and manifest) to URL (s3://bucket/prefix, any fsspec URL)."""
    store = ArtifactStore(load_config().run.root)
    view = TokensArtifact.of(store, store.resolve(artifact))
    if view.manifest.get("kind") != "tokens":
        raise InputError(f"{view.id} is a {view.manifest.get('kind')} artifact, not a tokens artifact")
    with _named(url):
        result = export_tokens(view.path, url)
    click.echo(f"{result.artifact}: {result.files} files, {human_bytes(result.bytes)} at {result.url}")


@register_command
@click.command("import-tokens")
@click.argument("url")
def import_tokens_cmd(url: str) -> None:
    """Copy the tokens artifact exported at URL into the artifact root: same id, same bytes, every file checked."""
    with _named(url):
        path, copied = import_tokens(url, load_config().run.root)
    if not copied:
        click.echo(f"{path.name} is already in the artifact root; nothing copied", err=True)
    click.echo(str(path))
