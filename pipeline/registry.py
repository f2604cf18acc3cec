"""The stage registry: what a stage declares (name, format version, kind, config sections, params,
inputs, arguments, resources), what it needs from outside the store, and the plugins that register stages.

A stage registers a ``run(ctx)`` function with its name, artifact kind, the config sections it reads, a
:class:`~pipeline.params.Params` declaration and an ``inputs`` function (config + args → upstream
:class:`~pipeline.planner.Request` s). The stage contract: the id params are every id (non-runtime,
:func:`pipeline.config.setting`) field of the declared sections and the request args, minus the
exclusions the stage declares (each with a condition and a reason), plus its derived values
(:mod:`pipeline.params`); ``ctx.config`` holds exactly the fields not excluded. The code part of its ids is
:func:`stage_code`: the code fingerprint of the module that defines ``run`` (:mod:`pipeline.fingerprint`)
and the stage's explicit on-disk ``format_version`` (bumped by hand only when the bytes a stage writes
change meaning without its code changing, e.g. a storage spec).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import ArtifactStore
from pipeline.config import check_section, get_path, to_container
from pipeline.environment import numeric_package_versions
from pipeline.errors import ConfigError, did_you_mean
from pipeline.fingerprint import Fingerprint, fingerprint
from pipeline.params import Params, resolve, view

if TYPE_CHECKING:
    from pipeline.context import StageContext
    from pipeline.planner import Request, Task

InputsFn = Callable[[DictConfig, Mapping[str, Any]], dict[str, "Request"]]


@dataclass(frozen=True)
class Stage:
    name: str
    format_version: str
    kind: str
    run: Callable[[StageContext], None]  # writes into ctx.out; manifest fields via ctx.record
    params: Params | None
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
    kind: str,
    format_version: str = "1",
    sections: tuple[str, ...] = (),
    params: Params | None = None,
    inputs: InputsFn | None = None,
    args: Mapping[str, Any] | None = None,
    resumable: bool = False,
    make_target: str | None = None,
    resources: Mapping[str, float] | None = None,
    description: str = "",
) -> Callable[[Callable[[StageContext], Any]], Callable[[StageContext], Any]]:
    """Decorator registering ``run(ctx)`` as a stage (see module docstring)."""

    if params is not None and not isinstance(params, Params):
        raise TypeError(f"stage {name}: params must be a pipeline.params.Params declaration, not {params!r}")

    def decorate(run: Callable[[StageContext], Any]) -> Callable[[StageContext], Any]:
        STAGES[name] = Stage(
            name=name, format_version=format_version, kind=kind, run=run, params=params,
            sections=tuple(dict.fromkeys((*sections, *_MORE_SECTIONS.get(name, ())))),
            inputs=inputs or (lambda cfg, args: {}), args=dict(args or {}), resumable=resumable,
            make_target=make_target or f"make {name}", resources=dict(resources or {}),
            description=description or (run.__doc__ or "").strip().split("\n")[0],
        )
        return run

    return decorate


def stage_fingerprint(stage: Stage) -> Fingerprint:
    """The code fingerprint of ``stage``: the module that defines its ``run``, every project module it
    imports and the plugin modules (see :mod:`pipeline.fingerprint`)."""
    return fingerprint(stage.run.__module__)


def stage_code(stage: Stage, digest: str, *, with_packages: bool = False) -> dict[str, Any]:
    """The code part of ``stage``'s artifact ids (``version`` in :func:`pipeline.artifacts.artifact_id`):
    the fingerprint ``digest`` and the format version; with ``with_packages``
    (``run.id_includes_packages``) also the installed versions of the packages that decide numerics."""
    code: dict[str, Any] = {"fingerprint": digest, "format": stage.format_version}
    if with_packages:
        code["packages"] = numeric_package_versions()
    return code


_MORE_SECTIONS: dict[str, tuple[str, ...]] = {}


def add_sections(stage: str, *sections: str) -> None:
    """Add config sections to a stage, registered or not yet (a method's own section joins the stage that
    fits it, e.g. ``umap`` to ``reduce``): their fields then enter that stage's id like any other."""
    _MORE_SECTIONS[stage] = tuple(dict.fromkeys((*_MORE_SECTIONS.get(stage, ()), *sections)))
    if stage in STAGES:
        STAGES[stage] = replace(STAGES[stage], sections=tuple(dict.fromkeys((*STAGES[stage].sections, *sections))))


def id_params(stage: Stage, cfg: DictConfig | dict[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """The params of ``stage``'s artifact id under ``cfg`` (a config or its plain resolved dict; see the
    module docstring); checks the declared sections' choices and ranges first."""
    tree = cfg if isinstance(cfg, dict) else to_container(cfg)
    for path in stage.sections:
        check_section(path, get_path(tree, path))
    return resolve(stage.params, stage.sections, tree, args).params


def stage_config(stage: Stage, tree: dict[str, Any], args: Mapping[str, Any]) -> DictConfig:
    """What ``stage`` may read of the plain config ``tree`` (``ctx.config``): its id fields not excluded."""
    return view(resolve(stage.params, stage.sections, tree, args).config)


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
