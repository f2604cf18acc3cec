"""Configuration: OmegaConf structured configs, YAML presets, Hydra-style dotted overrides.

The root config is assembled from *sections*: ``run`` (defined here) plus one dataclass per section
that stage plugins register with :func:`register_section`. A preset is a YAML file under
``configs/`` (``configs/datasets/<name>.yaml``, ``configs/<name>.yaml``) or a path; overrides are
``key.sub=value`` strings. Unknown keys and wrong types raise :class:`ConfigError` naming the key,
the value, the expected type and the nearest valid keys.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from functools import cache, lru_cache
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping
from typing import Any, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.errors import ConfigError, did_you_mean
from pipeline.paths import local_path

PRESET_DIRS: list[Path] = []
"""Folders of presets (``<dir>/<name>.yaml``, ``<dir>/datasets/``, ``<dir>/experiments/``), in the order
plugins registered them (:func:`register_preset_dir`)."""


def register_preset_dir(directory: Path) -> None:
    """Let a plugin ship presets and experiments (e.g. from its package data)."""
    directory = Path(directory)
    if directory not in PRESET_DIRS:
        PRESET_DIRS.append(directory)


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, runtime: bool = False,
            choices: tuple[Any, ...] | Callable[[], Iterable[Any]] | None = None, min: float | None = None,
            above: float | None = None, below: float | None = None, path: bool = False) -> Any:
    """A config field with its contract in metadata, for dataclass sections.

    ``runtime=True``: the field never changes an artifact's content (worker counts, inference batch sizes,
    devices, root paths), so it is left out of the artifact id and reaches a stage as ``ctx.runtime``;
    every other field is part of the id of each stage that declares its section. ``choices`` (a tuple, or
    a function giving them when they are checked, e.g. the names in a registry plugins add to), ``min``
    (inclusive), ``above``/``below`` (exclusive): the allowed values, checked by :func:`check_section`
    (None always passes a range check). ``path=True``: a filesystem path, a URL there is refused
    (:func:`pipeline.paths.local_path`).
    """
    metadata = {"runtime": runtime, "choices": choices, "min": min, "above": above, "below": below, "path": path}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SlurmConfig:
    """Site directives for ``--cluster slurm`` (passed to dask-jobqueue's SLURMCluster)."""

    queue: str | None = None
    account: str | None = None
    cores: int = 8
    memory: str = "32GB"
    walltime: str = "04:00:00"
    jobs: int = 2
    gpus_per_job: int = 0
    job_extra_directives: list[str] = field(default_factory=list)
    local_directory: str | None = None
    log_directory: str | None = None  # worker jobs' output files (dask-worker-<job>.out/.err); None: submit folder


@dataclass
class RunConfig:
    """How and where stages run; nothing here changes an artifact's content, and only ``id_includes_packages`` its id."""

    root: str = "${oc.env:STEGOPIPE_ROOT,artifacts}"
    executor: str = "auto"  # auto | local | dask
    scheduler: str | None = None  # tcp://host:port of an existing Dask scheduler
    cluster: str = "local"  # local | slurm (when executor is dask)
    workers: int = 0  # 0 = one per core
    device: str = "auto"  # auto | cpu | cuda
    lock_timeout_s: float = 3600.0
    verify_inputs: bool = True  # check input artifacts against their manifests before a stage reads them
    verify_hash_mb: float = 64.0  # ... re-hashing the files of inputs up to this size (MiB); bigger: sizes only
    id_includes_packages: bool = False  # put the versions of the numerics packages (torch, numpy, ...) into every id
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


SECTIONS: dict[str, type] = {"run": RunConfig}
"""Top-level sections by name; ``run`` is framework-only: no stage declares it and it never enters an id."""


def register_section(name: str, schema: type) -> None:
    """Add a top-level config section (a dataclass) to the root schema."""
    if not is_dataclass(schema):
        raise TypeError(f"section {name} must be a dataclass")
    existing = SECTIONS.get(name)
    if existing is not None and existing is not schema and existing.__qualname__ != schema.__qualname__:
        raise ValueError(f"config section '{name}' registered twice")
    SECTIONS[name] = schema


def section_class(path: str) -> type:
    """The dataclass of a section or sub-section (``"head"``, ``"dataset.synthetic"``)."""
    name, *rest = path.split(".")
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section '{name}'{did_you_mean(name, SECTIONS)}")
    cls = SECTIONS[name]
    for part in rest:
        hint = get_type_hints(cls).get(part)
        if not is_dataclass(hint):
            raise ConfigError(f"config section '{path}': '{part}' is not a sub-section of {cls.__name__}")
        cls = hint
    return cls


@cache
def section_fields(cls: type, prefix: str = "") -> tuple[tuple[str, Any, dict[str, Any]], ...]:
    """Every leaf field of a section dataclass: (dotted key relative to the section, type, metadata);
    the fields of a runtime sub-section are runtime. Cached per class (planning calls it per stage run)."""
    out: list[tuple[str, Any, dict[str, Any]]] = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            sub = section_fields(hints[f.name], f"{prefix}{f.name}.")
            if f.metadata.get("runtime"):
                sub = tuple((key, typ, {**meta, "runtime": True}) for key, typ, meta in sub)
            out += sub
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], dict(f.metadata)))
    return tuple(out)


def _pop(tree: dict[str, Any], dotted: str) -> Any:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    return tree.pop(leaf)


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def split_sections(cfg: Any, paths: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sections ``paths`` of a config (or of its plain resolved dict, left unchanged), split by the
    fields' metadata into (id part, runtime part): plain nested dicts keyed by section path; the ``run``
    section is always in the runtime part."""
    tree = cfg if isinstance(cfg, dict) else None

    def section(path: str) -> Any:
        if tree is not None:
            return copy.deepcopy(get_path(tree, path))
        node = OmegaConf.select(cfg, path)
        return to_container(node) if node is not None else None

    ident: dict[str, Any] = {}
    runtime: dict[str, Any] = {"run": section("run") if "run" in cfg else {}}
    for path in paths:
        values = section(path)
        values = {} if values is None else values
        moved: dict[str, Any] = {}
        for key, _, meta in section_fields(section_class(path)):
            if meta.get("runtime"):
                _put(moved, key, _pop(values, key))
        ident[path], runtime[path] = values, moved
    return ident, runtime


def field_choices(meta: dict[str, Any]) -> tuple[Any, ...] | None:
    """The allowed values of a field (its metadata's ``choices``, called when it is a function)."""
    choices = meta.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def check_section(path: str, values: Any) -> None:
    """Check a section's values against its fields' ``choices`` and ranges (see :func:`setting`); one
    :class:`ConfigError` naming the key, the value and what is allowed."""
    for key, _, meta in section_fields(section_class(path)):
        value = OmegaConf.select(values, key) if isinstance(values, DictConfig) else get_path(values, key)
        name = f"{path}.{key}"
        choices = field_choices(meta)
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")
        if meta.get("path") and value is not None:
            local_path(value, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{name}={value!r}: must be >= {meta['min']}")
        if meta.get("above") is not None and not value > meta["above"]:
            raise ConfigError(f"{name}={value!r}: must be > {meta['above']}")
        if meta.get("below") is not None and not value < meta["below"]:
            raise ConfigError(f"{name}={value!r}: must be < {meta['below']}")


def get_path(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of plain nested mappings (None where missing)."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def schema() -> DictConfig:
    """The empty root config with every registered section at its defaults (a fresh copy)."""
    return copy.deepcopy(_schema(tuple(SECTIONS.items())))


@cache
def _schema(sections: tuple[tuple[str, type], ...]) -> DictConfig:
    root_cls = make_dataclass("Root", [(name, cls, field(default_factory=cls)) for name, cls in sections])
    return OmegaConf.structured(root_cls)


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (leaves and nodes)."""
    keys = []
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            node = cfg._get_node(key)
            if isinstance(node, DictConfig):
                keys += all_keys(node, dotted + ".")
    return keys


ALIASES: dict[str, tuple[str, ...]] = {}
"""Top-level override names that set several config keys at once (``seed`` → the run seed's keys)."""


def register_alias(name: str, keys: Iterable[str]) -> None:
    """Let ``name=value`` (and a sweep ``name=a,b``) stand for ``key=value`` for every key of ``keys``,
    e.g. ``seed`` for the run seed an experiment's seeds vary."""
    ALIASES[name] = tuple(keys)


def expand_aliases(overrides: Iterable[str]) -> list[str]:
    """``overrides`` with every alias override (:func:`register_alias`) replaced by the keys it stands for."""
    out = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        name = key.strip().lstrip("+")
        out += [f"{k}={raw}" for k in ALIASES[name]] if sep and name in ALIASES else [text]
    return out


def _nearest(key: str, cfg: DictConfig) -> str:
    candidates = all_keys(cfg) + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:3]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _expected_type(cfg: DictConfig, key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig) and node._get_node(leaf) is not None:
        ref = node._get_node(leaf)._metadata.ref_type
        return getattr(ref, "__name__", str(ref)).replace("typing.", "")
    return "?"


def resolve_preset(preset: str) -> Path:
    """A preset name (``cocostuff27``, ``experiments/fig4``) or a YAML path → the file."""
    candidates = [Path(preset)]
    for directory in PRESET_DIRS:
        for sub in ("", "datasets", "experiments"):
            candidates.append(directory / sub / f"{preset}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    names = sorted({p.relative_to(d).with_suffix("").as_posix() for d in PRESET_DIRS for p in d.rglob("*.yaml")})
    short = [n.rpartition("/")[2] for n in names]
    raise ConfigError(f"unknown preset '{preset}'{did_you_mean(preset, short)} (no such file and not one of "
                      f"{', '.join(names)})")


def _merge_checked(cfg: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        key = str(exc.full_key) if getattr(exc, "full_key", None) else str(exc)
        raise ConfigError(f"{origin}: unknown config key '{key}'{_nearest(key, cfg)}") from None
    except ValidationError as exc:
        if not exc.full_key:  # e.g. a scalar given for a section: omegaconf names no key
            raise ConfigError(f"{origin}: {str(exc).splitlines()[0]}") from None
        key = str(exc.full_key)
        raise ConfigError(
            f"{origin}: key '{key}' got {exc.value!r}, expected type {_expected_type(cfg, key)}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{origin}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """An omegaconf / YAML error as one line: its first line (omegaconf appends full_key, types, ...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("+")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. head.dim=90)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({' '.join(str(exc).split())})") from None
    return key, value


def _nest(key: str, value: Any, into: dict[str, Any]) -> None:
    *parents, leaf = key.split(".")
    node = into
    for part in parents:
        child = node.get(part)
        node = node.setdefault(part, {}) if not isinstance(child, dict) else child
    node[leaf] = value


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Merge dotted overrides (later ones win); on a bad one, name that override."""
    if not overrides:
        return cfg
    overrides = expand_aliases(overrides)
    combined: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in cfg:
            raise ConfigError(f"override '{text}': unknown config key '{key}'{_nearest(key, cfg)}")
        _nest(key, value, combined)
    try:
        return _merge_checked(cfg, combined, "overrides")
    except ConfigError:
        for text in overrides:  # one at a time, to say which override is wrong
            nested: dict[str, Any] = {}
            _nest(*parse_override(text), nested)
            cfg = _merge_checked(cfg, nested, f"override '{text}'")
        raise


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (a fresh copy; the parse is cached per file content)."""
    text = path.read_text()
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return copy.deepcopy(data)


@lru_cache(maxsize=256)
def _parse_yaml(text: str) -> Any:
    return yaml.safe_load(text) or {}


def load_preset_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """A preset and the presets it ``extends:`` (base first)."""
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle through {', '.join(map(str, seen))}")
    data = load_yaml(path)
    bases = data.pop("extends", None) or []
    layers = []
    for base in [bases] if isinstance(bases, str) else bases:
        layers += load_preset_layers(resolve_preset(base), seen + (path,))
    return layers + [(path, data)]


_PresetKey = tuple[str, tuple[tuple[str, type], ...]]
_PRESETS: dict[_PresetKey, DictConfig] = {}


def _preset_layers(preset: str) -> tuple[_PresetKey, list[tuple[Path, dict[str, Any]]]]:
    """A preset's layers (base first) and what its config is made of: their content and the registered
    sections."""
    layers = load_preset_layers(resolve_preset(preset))
    for _, data in layers:
        data.pop("experiment", None)
    return (json.dumps([[str(path), data] for path, data in layers], sort_keys=True, default=repr),
            tuple(SECTIONS.items())), layers


def _preset_config(preset: str) -> DictConfig:
    """defaults ← the preset's layers, merged once per layers' content and registered sections (the
    cached config itself: callers copy it before changing it)."""
    key, layers = _preset_layers(preset)
    if key not in _PRESETS:
        cfg = schema()
        for path, data in layers:
            cfg = _merge_checked(cfg, data, str(path))
        _PRESETS[key] = cfg
    return _PRESETS[key]


def _merged(preset: str | None, overrides: list[str] | tuple[str, ...]) -> tuple[DictConfig, bool]:
    """defaults ← preset (and what it extends) ← overrides, unresolved, and whether it is a new object (else
    the cached preset config: copy it before changing it)."""
    base = _preset_config(preset) if preset else schema()
    cfg = apply_overrides(base, overrides)  # merging copies
    return cfg, cfg is not base


def _resolved(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its interpolations resolved in place."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        where = f" at {exc.full_key}" if getattr(exc, "full_key", None) else ""
        raise ConfigError(f"config interpolation failed{where}: {_one_line(exc)}") from None
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The root config: defaults ← preset (and what it extends) ← overrides, validated (a new object)."""
    cfg, new = _merged(preset, overrides)
    return _resolved(cfg if new else copy.deepcopy(cfg))


_PRIMITIVES = (bool, int, float, str)
_VARIANTS: dict[tuple[Any, ...], Variants] = {}


class Variants:
    """Configs of one preset and its overrides ``before`` and ``after`` with a few more leaf overrides
    between them (an experiment's cells: ``before`` its base overrides, ``after`` the command line's), as
    plain resolved trees: one OmegaConf merge for them all, each variant a copy of the paths it changes.

    :meth:`tree` gives the tree of ``load_config(preset, before + overrides + after)`` exactly, or None
    where a cell is not that simple (then call :func:`load_config`: its errors name what is wrong): an
    override of a section or a new key, a value the field would convert (``1`` for a float) or an
    interpolation, a key an ``after`` override also sets, or a base config with an interpolation other
    than ``${oc.env:...}`` (it could read an overridden key).
    """

    def __init__(self, preset: str | None, before: Iterable[str] = (), after: Iterable[str] = ()) -> None:
        self.overrides = [*before, *after]
        self.after_keys = [parse_override(text)[0] for text in expand_aliases(after)]
        unresolved, new = _merged(preset, self.overrides)
        self.simple = all(text.startswith("${oc.env:") for text in _interpolations(
            OmegaConf.to_container(unresolved, resolve=False)))
        self.cfg = _resolved(unresolved if new else copy.deepcopy(unresolved))
        self.base = to_container(self.cfg)
        self._values: dict[str, tuple[str, Any] | None] = {}

    @classmethod
    def of(cls, preset: str | None, before: Iterable[str] = (), after: Iterable[str] = ()) -> Variants:
        """The variants of ``preset`` and overrides, made once per preset content, overrides and environment
        (``${oc.env:...}`` values are resolved in them; ``gc`` plans every experiment, several share a preset)."""
        before, after = tuple(before), tuple(after)
        key = (_preset_layers(preset)[0] if preset else None, tuple(SECTIONS.items()), before, after,
               tuple(sorted(os.environ.items())))
        if key not in _VARIANTS:
            _VARIANTS[key] = cls(preset, before, after)
        return _VARIANTS[key]

    def _value(self, text: str) -> tuple[str, Any] | None:
        """(key, value as a merge stores it) of a leaf override, None when it is not one (cached)."""
        if text not in self._values:
            key, value = parse_override(text)
            stored = _leaf_value(self.cfg, key, value) if _is_leaf(self.cfg, key) and _plain(value) else _NOT_PLAIN
            self._values[text] = None if stored is _NOT_PLAIN else (key, stored)
        return self._values[text]

    def tree(self, overrides: Iterable[str]) -> dict[str, Any] | None:
        """The plain resolved tree with ``overrides`` applied (shares every unchanged sub-dict with the
        other variants: read it, never change it), or None (see the class)."""
        if not self.simple:
            return None
        tree = dict(self.base)
        for text in expand_aliases(overrides):
            found = self._value(text)
            if found is None:
                return None
            key, value = found
            if any(key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.") for k in self.after_keys):
                return None
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node[part] = dict(node[part])
                node = node[part]
            node[leaf] = value
        return tree


_NOT_PLAIN = object()


def _is_leaf(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and isinstance(node._get_node(leaf), ValueNode)


def _plain(value: Any) -> bool:
    """A value a merge stores as it is: a scalar that is not an interpolation or ``???``."""
    if isinstance(value, str):
        return "${" not in value and value != "???"
    return value is None or isinstance(value, _PRIMITIVES)


def _leaf_value(cfg: DictConfig, key: str, value: Any) -> Any:
    """``value`` as the leaf ``key`` stores it, or :data:`_NOT_PLAIN` when the leaf would convert or
    refuse it (a merge then warns or raises: :func:`load_config` does that)."""
    parent, _, leaf = key.rpartition(".")
    node = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)
    try:
        converted = node.validate_and_convert(value)
    except OmegaConfBaseException:
        return _NOT_PLAIN
    return converted if type(converted) is type(value) else _NOT_PLAIN


def _interpolations(tree: Any) -> list[str]:
    """Every string of a plain unresolved tree that holds an interpolation."""
    if isinstance(tree, dict):
        return [s for value in tree.values() for s in _interpolations(value)]
    if isinstance(tree, list):
        return [s for value in tree for s in _interpolations(value)]
    return [tree] if isinstance(tree, str) and "${" in tree else []


def to_container(cfg: Any) -> Any:
    """Plain dict/list copy of a config node (resolved)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg



def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

