"""The stage registry: what a stage declares (name, format version, kind, config sections, params,
inputs, arguments, resources), what it needs from outside the store, and the plugins that register stages.

A stage registers a ``run(ctx)`` function with its name, code version, artifact kind, the config
sections it reads, an optional ``params`` function and an ``inputs`` function (config + args → upstream
:class:`~pipeline.planner.Request` s). The stage contract: the id params come from the declared sections
with their runtime-only fields removed (:func:`pipeline.config.setting`): by default those values as they
are; a ``params`` function, when given, sees only them (a read-only view: reading a runtime field or an
undeclared section fails) and the request args, to validate and shape them.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import ArtifactStore
from pipeline.config import check_section, get_path, split_sections, to_container
from pipeline.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from pipeline.context import StageContext
    from pipeline.planner import Request, Task

ParamsFn = Callable[[DictConfig, Mapping[str, Any]], dict[str, Any]]
InputsFn = Callable[[DictConfig, Mapping[str, Any]], dict[str, "Request"]]


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    kind: str
    run: Callable[[StageContext], None]  # writes into ctx.out; manifest fields via ctx.record
    params: ParamsFn | None
    inputs: InputsFn
    args: Mapping[str, Any]
    resumable: bool
    make_target: str
    resources: Mapping[str, float]
    description: str
    sections: tuple[str, ...] = ()


STAGES: dict[str, Stage] = {}


def register_stage(
    name: str,
    *,
    version: str,
    kind: str,
    sections: tuple[str, ...] = (),
    params: ParamsFn | None = None,
    inputs: InputsFn | None = None,
    args: Mapping[str, Any] | None = None,
    resumable: bool = False,
    make_target: str | None = None,
    resources: Mapping[str, float] | None = None,
    description: str = "",
) -> Callable[[Callable[[StageContext], Any]], Callable[[StageContext], Any]]:
    """Decorator registering ``run(ctx)`` as a stage (see module docstring)."""

    def decorate(run: Callable[[StageContext], Any]) -> Callable[[StageContext], Any]:
        STAGES[name] = Stage(
            name=name, version=version, kind=kind, run=run, params=params, sections=tuple(sections),
            inputs=inputs or (lambda cfg, args: {}), args=dict(args or {}), resumable=resumable,
            make_target=make_target or f"make {name}", resources=dict(resources or {}),
            description=description or (run.__doc__ or "").strip().split("\n")[0],
        )
        return run

    return decorate


def config_view(tree: dict[str, Any]) -> DictConfig:
    """A read-only, struct-mode config of ``{section path: values}`` (missing keys raise)."""
    nested: dict[str, Any] = {}
    for path, values in tree.items():
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = values
    view = OmegaConf.create(nested)
    OmegaConf.set_struct(view, True)
    OmegaConf.set_readonly(view, True)
    return view


def id_params(stage: Stage, cfg: DictConfig | dict[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """The params of ``stage``'s artifact id under ``cfg`` (a config or its plain resolved dict; see the
    module docstring); checks the declared sections' choices and ranges first."""
    tree = cfg if isinstance(cfg, dict) else to_container(cfg)
    for path in stage.sections:
        check_section(path, get_path(tree, path))
    ident, _ = split_sections(tree, stage.sections)
    if stage.params is not None:
        return stage.params(config_view(ident), args)
    return ident[stage.sections[0]] if len(stage.sections) == 1 else ident  # every id field, as it is


def plugin_names() -> list[str]:
    """Modules that register stages and config sections: ``STEGOPIPE_PLUGINS`` (comma list), default ``stages.plugin``."""
    return [p for p in os.environ.get("STEGOPIPE_PLUGINS", "stages.plugin").split(",") if p]


def load_plugins(names: Iterable[str]) -> None:
    """Import the plugin modules (idempotent)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"STEGOPIPE_PLUGINS: cannot import plugin module '{name}' ({exc})") from exc


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'{did_you_mean(name, STAGES)}; stages: "
                          f"{', '.join(sorted(STAGES)) or '(none registered)'}")
    return STAGES[name]


@dataclass(frozen=True)
class Need:
    """Something outside the artifact store that a stage reads (a data root, a weights file)."""

    what: str  # e.g. "data root", "weights"
    path: str
    setting: str  # how to point at it, e.g. "dataset.root (make DATA_ROOT=..., or STEGOPIPE_DATA_ROOT)"
    ok: bool  # it exists

    def problem(self) -> str:
        return f"{self.what} {self.path} does not exist; set {self.setting}"


NeedsFn = Callable[[DictConfig, Mapping[str, Any]], list[Need]]
EstimateFn = Callable[["Task", ArtifactStore], "int | None"]
NEEDS: dict[str, NeedsFn] = {}
ESTIMATES: dict[str, EstimateFn] = {}


def register_needs(stage: str, needs: NeedsFn) -> None:
    """Declare what a stage reads from outside the store; ``plan`` shows it and ``run`` checks it first."""
    NEEDS[stage] = needs


def register_estimate(stage: str, estimate: EstimateFn) -> None:
    """Declare a size estimate (bytes) of a stage's missing artifact, shown by ``stegopipe plan``."""
    ESTIMATES[stage] = estimate
