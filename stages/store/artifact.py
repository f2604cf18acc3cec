"""Where the token store sits in a tokens artifact (:class:`TokensArtifact`) and :func:`open_tokens`, the
notebook entry point (an artifact id, a prefix, an artifact folder or a store path)."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pipeline.artifacts import ArtifactView
from pipeline.errors import InputError
from pipeline.paths import is_url
from stages.store.reader import TokenStore

TOKENS_STORE = "tokens.zarr"
"""The token store's folder name inside a tokens artifact."""


class TokensArtifact(ArtifactView):
    """A ``tokens`` artifact folder (extract's output, or an imported store): its token store, and its
    manifest, params (split, backbone, res, ...) and lineage. The one place that knows where the store
    sits inside the artifact."""

    @property
    def store_path(self) -> Path:
        return self.path / TOKENS_STORE

    @cached_property
    def store(self) -> TokenStore:
        return TokenStore(self.store_path)


def open_tokens(ref: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> TokenStore:
    """Open the token store of a tokens artifact, for notebooks and scripts (read-only).

    ``ref`` is an artifact id, an unambiguous id prefix (``"extract-3f2a"``), an artifact folder or a
    ``tokens.zarr`` path. Ids are looked up under ``root`` (default: ``$STEGOPIPE_ROOT``, else
    ``./artifacts``). InputError / MissingArtifactError name what was not found. A URL (``s3://...``, any
    fsspec URL) opens a token store exported there (:mod:`stages.store.remote`).
    """
    from pipeline.artifacts import ArtifactStore

    if is_url(str(ref)):
        from stages.store.remote import open_remote_tokens

        return open_remote_tokens(str(ref))
    path = Path(ref).expanduser()
    if not path.exists():
        store = ArtifactStore(root if root is not None else os.environ.get("STEGOPIPE_ROOT", "artifacts"))
        path = store.path(store.resolve(str(ref)))
    if (path / "zarr.json").is_file():
        return TokenStore(path)
    if (path / TOKENS_STORE).is_dir():
        return TokenStore(path / TOKENS_STORE)
    raise InputError(f"{path}: neither a token store nor an artifact folder holding {TOKENS_STORE} "
                     "(is it a tokens artifact, from the extract stage?)")
