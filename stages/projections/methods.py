"""The method registry: one :class:`Method` declaration per projection kind, made where it is implemented.

A method is what ``projection.method`` names: the stage that provides its artifact, the config fields
only it reads (and so how they enter the reduce stage's id), its fit, and its label and colour in
reports and figures. Every list of methods (the ``projection.method`` choices, the provider of each
method, report labels and colours, the contract test's contexts, ``make help``) is read from here,
so a new method is one new module: a plugin (``STEGOPIPE_PLUGINS``) or one import line in
``stages/projections/__init__.py``. Light: importing it imports no torch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import register_section
from pipeline.errors import ConfigError, did_you_mean
from pipeline.params import Derive, Exclude

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from stages.projections.base import BaseProjection
    from stages.projections.fitdata import FitData

FitFn = Callable[["FitData", "DictConfig"], "tuple[BaseProjection, dict[str, Any]]"]


@dataclass(frozen=True)
class Method:
    """A projection method (see the module docstring).

    ``stage``: the stage whose artifact provides it (``reduce``, ``train-head``; None: no artifact, the
    identity). ``module``: the module that registers its ``Projection`` kind (imported to load a saved
    one). ``fit(data, cfg)``: for ``reduce`` methods, the fitted projection and what to record, from the
    fit rows (:class:`~stages.projections.fitdata.FitData`) and the stage's ``ctx.config``. ``fields``:
    config fields (dotted, patterns allowed) only this method reads: other methods leave them out of
    the reduce id. ``section``: a config section of its own, ``(name, dataclass)``. ``exclude``: more
    exclusions, ``derive``: derived values (e.g. a backend resolved at plan time), while it is selected. ``seeded``: ``projection.seed`` changes its fit.
    ``all_dims``: one artifact serves every ``projection.dim`` (narrowed when read). ``dim_required``:
    ``projection.dim`` must be set. ``materialize``: write projected train/val stores by default (an
    expensive transform). ``contexts``: overrides (beyond ``projection.method=<name>``) under which the
    contract test checks every field. ``paper``: False marks it in reports as beyond the paper.
    ``legend``: position in legends and tables (lower first; the paper's order: DINO, PCA, RP, h-NNE, STEGO)."""

    name: str
    label: str
    colour: str
    stage: str | None
    module: str
    fit: FitFn | None = None
    fields: tuple[str, ...] = ()
    section: tuple[str, type] | None = None
    exclude: tuple[Exclude, ...] = ()
    derive: tuple[Derive, ...] = ()
    seeded: bool = True
    all_dims: bool = False
    dim_required: bool = True
    materialize: bool = False
    contexts: tuple[tuple[str, ...], ...] = ((),)
    paper: bool = True
    legend: int = 50


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Declare a method (once per name); registers its config section and adds it to its stage."""
    existing = METHODS.get(method.name)
    if existing is not None and existing.module != method.module:
        raise ConfigError(f"projection method {method.name!r} is already registered by {existing.module}")
    METHODS[method.name] = method
    if method.section is not None:
        from pipeline.registry import add_sections

        register_section(*method.section)
        if method.stage is not None:
            add_sections(method.stage, method.section[0])
    return method


def method_names() -> tuple[str, ...]:
    """Every registered method name, in legend order (the ``projection.method`` choices)."""
    return tuple(m.name for m in methods())


def methods(stage: str | None = "*") -> list[Method]:
    """The registered methods in legend order; only those ``stage`` provides unless ``stage`` is ``"*"``."""
    found = sorted(METHODS.values(), key=lambda m: (m.legend, m.name))
    return found if stage == "*" else [m for m in found if m.stage == stage]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"projection.method={name!r}: expected one of {', '.join(method_names())}"
                          f"{did_you_mean(name, METHODS)}")
    return METHODS[name]


def method_fields(stage: str) -> Sequence[Exclude]:
    """Each method's own fields, excluded from ``stage``'s id whenever another method is selected."""
    return tuple(Exclude(m.fields + ((f"{m.section[0]}.*",) if m.section else ()),
                         f"only projection.method={m.name} reads them",
                         when=lambda cfg, args, name=m.name: cfg.projection.method != name)
                 for m in methods(stage) if m.fields or m.section)


def method_exclusions(stage: str) -> Sequence[Exclude]:
    """What each method of ``stage`` leaves out while it is selected (its ``exclude``)."""
    return tuple(Exclude(rule.keys, f"projection.method={m.name}: {rule.reason}",
                         when=lambda cfg, args, name=m.name, rule=rule: cfg.projection.method == name and
                         (rule.when is None or rule.when(cfg, args)))
                 for m in methods(stage) for rule in m.exclude)


def method_derived(stage: str) -> Sequence[Derive]:
    """Each method's derived values (its ``derive``), computed while it is selected."""
    return tuple(Derive(rule.name, rule.value, rule.replaces, (*rule.uses, "projection.method"),
                        when=lambda cfg, args, name=m.name, rule=rule: cfg.projection.method == name and
                        (rule.when is None or rule.when(cfg, args)))
                 for m in methods(stage) for rule in m.derive)
