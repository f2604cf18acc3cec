"""One exception family for everything stegopipe reports to a user.

Every error carries a message that says what is wrong and what to do about it; the CLI prints
it as one line (no traceback unless ``--debug``) and exits non-zero.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class StegopipeError(Exception):
    """Base class: an error whose message is meant for the user as it stands."""


class ConfigError(StegopipeError):
    """A bad configuration: names the key, the value and the allowed values."""


class InputError(StegopipeError):
    """A bad input file or array: names the file (or array) and what is wrong with it."""


class MissingArtifactError(StegopipeError):
    """An upstream artifact is missing: names the make target / command that builds it."""


class ArtifactError(StegopipeError):
    """An artifact is corrupt, half-written or does not match its storage spec."""


class StageError(StegopipeError):
    """A stage failed; nothing was published."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` naming the choices closest to ``name`` (empty when none is close)."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""
