"""Experiments: a matrix of configs expanded into stage requests, deduplicated by artifact id.

An experiment file (``configs/experiments/<name>.yaml``)::

    experiment: fig4                 # its name
    description: ...
    preset: cocostuff27              # base preset (optional) ...
    overrides: [run.workers=2]       # ... and base overrides
    matrix:                          # a list of blocks; each block is a cartesian product of axes,
      - preset: [cocostuff27]        # the experiment is the union of the blocks. The axis `preset`
        projection.method: [pca, rp] # swaps the base preset; other axes are dotted config keys.
        projection.dim: [3, 6, 12]
    targets: [evaluate]              # stages (or {stage:, args:}) requested at every matrix point
    collect: report                  # optional stage that receives every target artifact as input
    copy_to: reports/fig4            # optional: copy the collected artifact's files here after a run

Points that resolve to the same artifact id run once (e.g. one tokens artifact and one PCA fit shared
by every dim of a sweep).
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config import PRESET_DIRS, Variants, expand_aliases, load_config, load_yaml, parse_override
from pipeline.errors import ConfigError, did_you_mean
from pipeline.params import View
from pipeline.planner import Request, Task, plan, problems_error
from pipeline.registry import get_stage

KNOWN_KEYS = {"experiment", "description", "preset", "overrides", "matrix", "targets", "collect", "copy_to"}


def experiment_dirs() -> list[Path]:
    """``experiments/`` of every registered preset folder."""
    return [d / "experiments" for d in PRESET_DIRS]


def experiment_names() -> list[str]:
    return sorted({p.stem for d in experiment_dirs() for p in d.glob("*.yaml")})


def experiment_path(name: str) -> Path | None:
    for path in (Path(name), *(d / f"{name}.yaml" for d in experiment_dirs())):
        if path.suffix == ".yaml" and path.is_file():
            return path
    return None


def sweep_values(text: str) -> list[Any] | None:
    """The values of a sweep override ``key=a,b,c`` (each YAML-parsed, as in an override), or None when
    the value is one value: no top-level comma (``key=[1,2]``, ``key='a,b'`` and ``key={x: 1}`` are one)."""
    key, sep, raw = text.partition("=")
    raw = raw.strip()
    if not sep or "," not in raw or raw[:1] in "[{'\"":
        return None
    return [parse_override(f"{key}={part}")[1] for part in raw.split(",")]


@dataclass
class Experiment:
    name: str
    path: Path
    spec: dict[str, Any]

    @classmethod
    def sweep(cls, stage: str, overrides: Iterable[str], *, preset: str | None = None, report: str | None = None,
              args: Mapping[str, Any] | None = None) -> Experiment:
        """A Hydra-style multirun as an experiment: every override whose value is a comma list
        (``projection.dim=4,16``) is an axis of one matrix block, the others are base overrides;
        ``stage`` (with ``args``) is the target at every point; ``report`` names a report of them all
        (copied to ``reports/<report>``)."""
        axes: dict[str, list[Any]] = {}
        fixed = []
        for text in expand_aliases(overrides):
            values = sweep_values(text)
            if values is None:
                fixed.append(text)
            else:
                axes[parse_override(text)[0]] = values
        spec: dict[str, Any] = {"experiment": report or "multirun", "preset": preset, "overrides": fixed,
                                "matrix": [axes], "targets": [{"stage": stage, "args": dict(args or {})}]}
        if report:
            spec.update(collect="report", copy_to=f"reports/{report}")
        return cls(spec["experiment"], Path(f"<multirun {stage}>"), spec)

    @classmethod
    def load(cls, name: str) -> Experiment:
        path = experiment_path(name)
        if path is None:
            raise ConfigError(f"unknown experiment '{name}'{did_you_mean(name, experiment_names())}; "
                              f"experiments: {', '.join(experiment_names())}")
        spec = load_yaml(path)
        unknown = set(spec) - KNOWN_KEYS
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(KNOWN_KEYS)}")
        if not spec.get("targets"):
            raise ConfigError(f"{path}: 'targets' must list at least one stage")
        return cls(spec.get("experiment", path.stem), path, spec)

    def points(self) -> list[tuple[str | None, list[str]]]:
        """(preset, overrides) for every matrix point, in file order, duplicates removed."""
        blocks = self.spec.get("matrix") or [{}]
        if isinstance(blocks, dict):
            blocks = [blocks]
        seen, points = set(), []
        for block in blocks:
            if not isinstance(block, dict):
                raise ConfigError(f"{self.path}: every matrix block must be a mapping of axis: [values]")
            axes = {k: v if isinstance(v, list) else [v] for k, v in block.items()}
            for combo in itertools.product(*axes.values()):
                chosen = dict(zip(axes, combo))
                preset = chosen.pop("preset", self.spec.get("preset"))
                overrides = [f"{k}={json.dumps(v)}" for k, v in chosen.items()]
                key = (preset, tuple(overrides))
                if key not in seen:
                    seen.add(key)
                    points.append((preset, overrides))
        return points

    def targets(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for target in self.spec["targets"]:
            if isinstance(target, str):
                out.append((target, {}))
            elif isinstance(target, dict) and "stage" in target:
                out.append((target["stage"], dict(target.get("args") or {})))
            else:
                raise ConfigError(f"{self.path}: target {target!r} must be a stage name or {{stage:, args:}}")
        return out

    def plan(self, overrides: Iterable[str] = (), problems: list[str] | None = None, *,
             placeholders: bool = True) -> tuple[list[Task], list[str]]:
        """Tasks of the whole experiment (dependency order) and the ids of its final artifacts.

        Every bad config of every matrix point is reported at once (see :func:`pipeline.planner.plan`);
        with a ``problems`` list, what cannot be planned is a placeholder (or left out, without
        ``placeholders``) and nothing is collected.
        """
        overrides = list(overrides)
        base = list(self.spec.get("overrides") or [])
        variants: dict[str | None, Variants] = {}

        def config(preset: str | None, point: list[str]) -> View | DictConfig:
            """One merge per preset; each point's overrides set leaves of a copy (else load_config)."""
            if preset not in variants:
                variants[preset] = Variants.of(preset, base, overrides)
            tree = variants[preset].tree(point)
            return View(tree) if tree is not None else load_config(preset, base + point + overrides)

        requests = [Request(stage, cfg, args) for preset, point in self.points() for cfg in [config(preset, point)]
                    for stage, args in self.targets()]
        collect = self.spec.get("collect")
        found: list[str] = []
        tasks, targets = plan(requests, found, placeholders=placeholders)
        if found:
            if problems is None:
                raise problems_error(found)
            problems += found
            return tasks, targets
        if not collect:
            return tasks, targets
        get_stage(collect)
        cfg = config(self.spec.get("preset"), [])
        extra = {f"{n:04d}": target for n, target in enumerate(dict.fromkeys(targets))}
        collect_tasks, collect_ids = plan([Request(collect, cfg, {"experiment": self.name}, extra)], problems)
        return tasks + collect_tasks, collect_ids
