"""Settings that take a filesystem path: a URL there is refused in one line, never taken for a folder name.

Artifact roots, data roots, weights folders and report folders are read and written with local file
operations (locks, renames, ``pread``), so they must be local or shared filesystem paths. Without this
check ``STEGOPIPE_ROOT=s3://bucket/x`` would silently become a local folder named ``s3:``.
"""
from __future__ import annotations

import os
import re
from typing import Any

import click

from pipeline.errors import ConfigError

URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""``scheme://`` at the start of a value: s3://, gs://, http://, file://, ..."""

_OBJECT_STORAGE_HINT = ("to keep token stores in object storage, export them: `stegopipe export-tokens ID URL` "
                        "(read there with open_tokens(URL); `stegopipe import-tokens URL` brings one back)")


def is_url(value: str | os.PathLike[str]) -> bool:
    """Whether ``value`` starts with a URL scheme (``scheme://``)."""
    return isinstance(value, str) and URL_SCHEME.match(value) is not None


def local_path(value: str | os.PathLike[str], setting: str) -> str | os.PathLike[str]:
    """``value`` unchanged when it is a filesystem path; ConfigError naming ``setting`` when it is a URL."""
    if is_url(value):
        raise ConfigError(f"{setting}={value} is a URL, but it must be a local or shared filesystem path "
                          f"(a bucket mounted as a folder works); {_OBJECT_STORAGE_HINT}")
    return value


class LocalPath(click.Path):
    """``click.Path`` for command-line arguments and options that take a filesystem path: a URL is refused
    with :func:`local_path`'s one line instead of becoming a local folder named ``s3:``."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            local_path(value, param.opts[0] if isinstance(param, click.Option) else
                       param.human_readable_name if param is not None else "path")
        return super().convert(value, param, ctx)
