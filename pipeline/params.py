"""A stage's id params, complete by construction.

A stage's id params are *all* id fields of the config sections it declares (every field not marked
``runtime``), keyed by their dotted path (``"projection.dim"``), and its request args (``split``), minus
the fields it excludes, each :class:`Exclude` with a condition and a reason, plus :class:`Derive` d values
(a content hash of a weights file, an effective width) that enter under their own names and may replace
the fields they are computed from. ``ctx.config`` holds exactly the fields that are not excluded, so a
stage cannot read a field its id does not cover.

Each stage also declares the :class:`Context` s (methods, splits, ...) its contract test covers:
``tests/test_stage_contract.py`` flips every field in every context and checks that an included field
changes the params and an excluded one does not.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import get_path, section_class, section_fields

Cond = Callable[[Any, Mapping[str, Any]], bool]  # (a read-only view of the id fields, request args)


@dataclass(frozen=True)
class Exclude:
    """Fields (dotted paths, ``fnmatch`` patterns) left out of the params where ``when(cfg, args)`` holds
    (always when ``when`` is None), and why: e.g. ``Exclude(("projection.dim",), "one fit serves every
    dim", when=lambda cfg, args: cfg.projection.method == "pca")``. ``when`` sees every id field."""

    keys: tuple[str, ...]
    reason: str
    when: Cond | None = None

    def matches(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.keys)


@dataclass(frozen=True)
class Derive:
    """A value entering the params as ``name``: ``value(cfg, args)`` sees only the fields it ``replaces``
    (they then leave the params, the derived value covers them) and the fields it ``uses`` (they stay);
    only where ``when`` holds (always when None)."""

    name: str
    value: Callable[[Any, Mapping[str, Any]], Any]
    replaces: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    when: Cond | None = None


@dataclass(frozen=True)
class Context:
    """A situation the contract test checks every field in: config ``overrides`` and request ``args``.
    ``{placeholders}`` in overrides name files the test provides (see tests/test_stage_contract.py)."""

    overrides: tuple[str, ...] = ()
    args: Mapping[str, Any] = field(default_factory=dict)


def _items(value: Any) -> tuple[Any, ...]:
    return tuple(value() if callable(value) else value)


@dataclass(frozen=True)
class Params:
    """What a stage declares about its id params. ``exclude``, ``derive`` and ``contexts`` may be
    zero-argument callables (lists derived from a registry at the time they are read); ``check(cfg, args)``
    validates the included fields (raising ConfigError) before derived values are computed."""

    exclude: Sequence[Exclude] | Callable[[], Sequence[Exclude]] = ()
    derive: Sequence[Derive] | Callable[[], Sequence[Derive]] = ()
    check: Callable[[Any, Mapping[str, Any]], None] | None = None
    contexts: Sequence[Context] | Callable[[], Sequence[Context]] = (Context(),)

    def exclusions(self) -> tuple[Exclude, ...]:
        return _items(self.exclude)

    def derived(self) -> tuple[Derive, ...]:
        return _items(self.derive)

    def test_contexts(self) -> tuple[Context, ...]:
        return _items(self.contexts)


@dataclass(frozen=True)
class Resolved:
    """The params of one stage run, the included fields (``ctx.config``, nested) and why each excluded
    field was left out (dotted key → reason)."""

    params: dict[str, Any]
    config: dict[str, Any]
    excluded: dict[str, str]


def id_fields(sections: Sequence[str]) -> list[str]:
    """Dotted paths of every id (non-runtime) field of ``sections``."""
    return [f"{path}.{key}" for path in sections for key, _, meta in section_fields(section_class(path))
            if not meta.get("runtime")]


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def view(values: Mapping[str, Any]) -> DictConfig:
    """A read-only, struct-mode config of dotted ``values`` (a missing key raises)."""
    cfg = OmegaConf.create(_nested(values))
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


class View(Mapping[str, Any]):
    """What conditions, checks and derived values read while planning, and the config of an experiment's
    cell (:class:`pipeline.config.Variants`): nested values by attribute or key, read-only; a key that is
    not there raises (as ``ctx.config`` does), naming its dotted path. Light: planning resolves every stage
    run of a sweep."""

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self._data, self._path = data, path

    def __getitem__(self, key: str) -> Any:
        if key not in self._data:
            raise KeyError(f"{self._path}{key}: not among the fields this stage may read here")
        value = self._data[key]
        return View(value, f"{self._path}{key}.") if isinstance(value, dict) else value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(exc.args[0]) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def plain(self) -> Mapping[str, Any]:
        """The nested values it reads (not a copy: do not change them)."""
        return self._data


def _light(values: Mapping[str, Any]) -> View:
    return View(_nested(values))


def resolve(spec: Params | None, sections: Sequence[str], tree: Mapping[str, Any],
            args: Mapping[str, Any]) -> Resolved:
    """Params, included fields and exclusions of a stage declaring ``spec`` and ``sections`` under the
    plain config ``tree`` and request ``args`` (see the module docstring)."""
    spec = spec or Params()
    values = {key: get_path(tree, key) for key in id_fields(sections)}
    full = _light(values)
    excluded: dict[str, str] = {}
    for rule in spec.exclusions():
        if rule.when is None or rule.when(full, args):
            for key in values:
                if key not in excluded and rule.matches(key):
                    excluded[key] = rule.reason
    included = {k: v for k, v in values.items() if k not in excluded}
    if spec.check is not None:
        spec.check(_light(included), args)
    derived: dict[str, Any] = {}
    replaced: set[str] = set()
    for rule in spec.derived():
        if rule.when is None or rule.when(full, args):
            derived[rule.name] = rule.value(_light({k: values[k] for k in (*rule.replaces, *rule.uses)}), args)
            replaced.update(rule.replaces)
    params = {**args, **{k: v for k, v in included.items() if k not in replaced}, **derived}
    return Resolved(params, _nested(included), excluded)
