"""The ``stegopipe`` command line (click).

Stage plugins (``STEGOPIPE_PLUGINS``, default ``stages.plugin``) register stages, config sections and
extra commands: :func:`register_lazy_commands` (the command's module is imported only when it runs, so
``--help`` and completion stay light) or :func:`register_command` (from a module the plugin imports).
The built-in commands import plugins only when they need stages or their label fields (``run``, ``plan``,
``stages``, ``gc``, ``config``, ``ls``, ``show``, ``results``, ``experiments``; plugin registration is light);
``verify`` and ``pin`` read the artifact store alone. Errors of
the :class:`StegopipeError` family print as one line and exit with status 2 (``--debug`` shows the
traceback).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

if "--quiet" in sys.argv[1:] or not sys.stderr.isatty():
    # tqdm reads TQDM_* when it is imported: no progress bars (no `\r` lines) when they would not be
    # seen as bars; the runner's per-stage [run]/[done] lines remain
    os.environ.setdefault("TQDM_DISABLE", "1")
# A run stopped by Ctrl-C tears its Dask cluster down mid-task; multiprocessing's resource tracker (a process
# of its own, started with this interpreter's -W options) then unlinks the cluster's semaphores, as it
# should, but warns about them as if they had leaked. Our message says what happened; its warning is noise.
sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")

import click  # noqa: E402
from click.shell_completion import CompletionItem  # noqa: E402

from pipeline import estimates, executor, planner, registry, results, runner  # noqa: E402
from pipeline.artifacts import ArtifactStore, manifest_bytes, stage_of  # noqa: E402
from pipeline.config import (SECTIONS, check_section, get_path, load_config, parse_override,  # noqa: E402
                             to_container, to_yaml)
from pipeline.errors import ArtifactError, ConfigError, StegopipeError, did_you_mean  # noqa: E402
from pipeline.experiments import Experiment, experiment_names, experiment_path, sweep_values  # noqa: E402
from pipeline.labels import (COLUMNS, Labeller, chain, distinguishing, format_cell, leaves, manifest_reader,  # noqa: E402
                             store_lookup)
from pipeline.progress import duration  # noqa: E402
from pipeline.adopt import FULL_BELOW_S, SAMPLE_SHARDS, adopt  # noqa: E402
from pipeline.why import Explainer  # noqa: E402

EXTRA_COMMANDS: list[click.Command] = []
LAZY_COMMANDS: dict[str, tuple[str, str]] = {}  # command name -> (module that registers it, short help)


def register_command(command: click.Command) -> click.Command:
    """Let a plugin add a subcommand (e.g. ``export-squirrel``)."""
    EXTRA_COMMANDS.append(command)
    return command


def register_lazy_commands(module: str, commands: dict[str, str]) -> None:
    """Let a plugin announce subcommands ``{name: short help}`` that ``module`` registers (with
    :func:`register_command`) when imported; it is imported only when one of them runs."""
    for name, short_help in commands.items():
        LAZY_COMMANDS[name] = (module, short_help)


class PluginGroup(click.Group):
    """A click group whose plugin commands are loaded on demand (see the module docstring)."""

    def _load(self, module: str | None = None) -> None:
        registry.load_plugins(registry.plugin_names() + ([module] if module else []))
        for command in EXTRA_COMMANDS:
            if command.name not in self.commands:
                self.add_command(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            self._load()
            if name not in self.commands and name in LAZY_COMMANDS:
                self._load(LAZY_COMMANDS[name][0])
        return super().get_command(ctx, name)

    def _short_help(self, ctx: click.Context, name: str, limit: int = 45) -> str | None:
        """A command's one-line help without importing a lazy command's module (None: hidden/unknown)."""
        if name in LAZY_COMMANDS and name not in self.commands:
            return LAZY_COMMANDS[name][1]
        command = self.get_command(ctx, name)
        return None if command is None or command.hidden else command.get_short_help_str(limit)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = [(name, text) for name in names if (text := self._short_help(ctx, name, limit)) is not None]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        names = [n for n in self.list_commands(ctx) if n.startswith(incomplete)]
        items = [CompletionItem(n, help=text) for n in names if (text := self._short_help(ctx, n)) is not None]
        return items + click.Command.shell_complete(self, ctx, incomplete)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StegopipeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 5.0
_stop_requested: list[float] = []


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM (Ctrl-C, ``kill``, ``scancel``, a requeue or preemption) unwinds the run: the
    running stage's lock is released, its staging folder kept and SLURM worker jobs cancelled. Another stop
    signal within :data:`REPEAT_WINDOW_S` is the same request (SLURM signals every process of a job and the
    batch script forwards one more); a later one quits at once."""
    if not _stop_requested:
        _stop_requested.append(time.monotonic())
        raise KeyboardInterrupt
    if time.monotonic() - _stop_requested[0] > REPEAT_WINDOW_S:
        os._exit(128 + signum)


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """stegopipe: a staged, feature-caching pipeline for STEGO-style unsupervised segmentation.

    Run `stegopipe run demo` for the whole pipeline on synthetic data, `stegopipe stages` for the
    stage list, `stegopipe ls` for what is cached.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for stop in STOP_SIGNALS:
        signal.signal(stop, _interrupt)


def store_from() -> ArtifactStore:
    """The artifact store of ``run.root`` (``STEGOPIPE_ROOT``)."""
    return ArtifactStore(load_config().run.root)


# --------------------------------------------------------------------------------------------------
# shell completion: stage, experiment and artifact names (the plugins' light registration suffices)
# --------------------------------------------------------------------------------------------------


def _load_plugins() -> None:
    registry.load_plugins(registry.plugin_names())


def _complete_stages(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    _load_plugins()
    return [CompletionItem(name, help="stage") for name in sorted(registry.STAGES) if name.startswith(incomplete)]


def _complete_targets(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    stages = _complete_stages(ctx, param, incomplete)  # loads the plugins, which also register experiment folders
    return [CompletionItem(name, help="experiment") for name in experiment_names()
            if name.startswith(incomplete)] + stages


def _complete_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(a) for a in store_from().ids() if a.startswith(incomplete)]


# --------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------

_FIRST_KEYS = ("method", "dataset", "split", "dim", "backbone", "res", "seed", "experiment")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 3 else ",".join(_short(v) for v in value)
    text = str(value)
    return text if len(text) <= 16 else text[:15] + "…"


def params_summary(params: dict[str, Any], width: int = 72) -> str:
    """A one-line ``key=value`` summary of an artifact's params, the telling keys first."""
    shown_leaves = [(k, v) for k, v in leaves(params) if v is not None and k]
    order = {key: n for n, key in enumerate(_FIRST_KEYS)}
    shown_leaves.sort(key=lambda kv: order.get(kv[0].rsplit(".", 1)[-1], len(order)))
    names = [k.rsplit(".", 1)[-1] for k, _ in shown_leaves]
    shown = [name if name in order and names.count(name) == 1 else k for name, (k, _) in zip(names, shown_leaves)]
    text = " ".join(f"{key}={_short(v)}" for key, (_, v) in zip(shown, shown_leaves))
    return text if len(text) <= width else text[: width - 1] + "…"


def human_bytes(n: float) -> str:
    """``812 B``, ``1.5 MB``, ... (powers of 1000)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _when(created: str | None) -> str:
    return (created or "")[:16].replace("T", " ")


def labeller(store: ArtifactStore, tasks: list[planner.Task] | tuple[()] = (),
             manifest_of: Callable[[str], dict[str, Any] | None] | None = None) -> Labeller:
    """Labels from a plan's tasks, then the store's manifests (read through ``manifest_of`` when given);
    the plugins declare the label fields."""
    _load_plugins()
    planned = {t.id: (t.stage, t.params, t.inputs) for t in tasks}
    return Labeller(chain(planned.get, store_lookup(store, manifest_of)))


def _label_rows(labels: Labeller, ids: list[str], stages: list[str]) -> list[tuple[str, str]]:
    """Each artifact's label text, and the params that tell apart artifacts of one stage whose labels are
    equal (``lr=0.001``; empty where the label is unique)."""
    texts = [labels.text(a) for a in ids]
    keyed = [f"{stage}|{text}" for stage, text in zip(stages, texts, strict=True)]
    return list(zip(texts, distinguishing(keyed, [labels.params(a) for a in ids]), strict=True))


def _with_extra(text: str, extra: str) -> str:
    return f"{text} [{extra}]" if extra else text


def _lock_holder(store: ArtifactStore, artifact: str) -> str | None:
    """Who is building ``artifact`` now (None when no live lock holds it)."""
    lock = store.lock(artifact)
    if not lock.path.exists() or lock.is_stale():
        return None
    return lock.describe()


# --------------------------------------------------------------------------------------------------


def _plan_target(target: str, overrides: tuple[str, ...], preset: str | None, cli_overrides: list[str],
                 problems: list[str] | None, *, multirun: bool = False,
                 report: str | None = None) -> tuple[list[planner.Task], list[str], Any, Experiment | None]:
    """Tasks, target ids, config and experiment (if any) of ``run TARGET`` (see :func:`planner.plan`); with
    ``multirun``, a stage TARGET swept over the comma lists in ``overrides`` as one experiment (one DAG)."""
    _load_plugins()
    if report and not multirun:
        raise ConfigError("--report NAME writes a report of a multirun: add -m (an experiment file names its "
                          "report with `collect: report`)")
    if target in registry.STAGES:
        stage = registry.get_stage(target)
        args = {}
        config_overrides = []
        for text in overrides:
            key, value = parse_override(text)
            if key in stage.args:
                if multirun and sweep_values(text) is not None:
                    raise ConfigError(f"{text}: a stage argument cannot be swept; sweep config keys "
                                      f"(e.g. projection.dim=4,16)")
                args[key] = value
            else:
                config_overrides.append(text)
        if multirun:
            experiment = Experiment.sweep(target, config_overrides, preset=preset, report=report, args=args)
            cfg = load_config(preset, [t for t in config_overrides if sweep_values(t) is None] + cli_overrides)
            tasks, targets = experiment.plan(cli_overrides, problems)
            return tasks, targets, cfg, experiment
        try:
            cfg = load_config(preset, config_overrides + cli_overrides)
        except ConfigError as exc:
            swept = [t for t in config_overrides if sweep_values(t) is not None]
            if swept:
                raise ConfigError(f"{exc} (to sweep over comma-separated values, add -m: "
                                  f"stegopipe run -m {target} {' '.join(overrides)})") from None
            raise
        tasks, targets = planner.plan([planner.Request(target, cfg, args)], problems)
        return tasks, targets, cfg, None
    if multirun:
        raise ConfigError(f"-m sweeps a stage ({', '.join(sorted(registry.STAGES))}); '{target}' is not one "
                          "(an experiment file holds its own matrix)")
    if experiment_path(target):
        experiment = Experiment.load(target)
        cfg = load_config(experiment.spec.get("preset") or preset,
                          list(experiment.spec.get("overrides") or []) + list(overrides) + cli_overrides)
        tasks, targets = experiment.plan(list(overrides) + cli_overrides, problems)
        return tasks, targets, cfg, experiment
    names = sorted(registry.STAGES) + experiment_names()
    raise ConfigError(f"'{target}' is neither a stage ({', '.join(sorted(registry.STAGES))}) "
                      f"nor an experiment ({', '.join(experiment_names())}){did_you_mean(target, names)}")


_PRESET = click.option("--preset", "-p", help="Config preset (configs/datasets/<name>.yaml or a YAML path).")
_MULTIRUN = click.option("--multirun", "-m", is_flag=True,
                         help="Sweep: every key=a,b,c override is an axis; all points are planned as one DAG.")
_REPORT = click.option("--report", metavar="NAME", help="With -m: also a report of every point (reports/NAME).")


@main.command("run")
@click.argument("target", shell_complete=_complete_targets)
@click.argument("overrides", nargs=-1)
@_PRESET
@click.option("--force", "force_stages", multiple=True, help="Re-run this stage even if cached (repeatable).")
@click.option("--no-upstream", is_flag=True, help="Run only TARGET; fail if an input artifact is missing.")
@click.option("--executor", type=click.Choice(["auto", "local", "dask"]), help="Override run.executor.")
@click.option("--scheduler", help="Address of an existing Dask scheduler (tcp://host:port).")
@click.option("--cluster", type=click.Choice(["local", "slurm"]), help="Dask cluster to start.")
@click.option("--workers", type=int, help="Dask LocalCluster workers (default: one per core).")
@_MULTIRUN
@_REPORT
@click.option("--verbose", "-v", is_flag=True, help="List the cached artifacts one by one ([hit] lines).")
def run_cmd(target: str, overrides: tuple[str, ...], preset: str | None, force_stages: tuple[str, ...],
            no_upstream: bool, executor: str | None, scheduler: str | None, cluster: str | None,
            workers: int | None, multirun: bool, report: str | None, verbose: bool) -> None:
    """Build TARGET (a stage or an experiment) and everything it needs that is not cached.

    OVERRIDES are dotted config keys (head.dim=90 dataset.root=/data/coco) and stage arguments
    (split=val). Every config problem and every missing data root or weights file is reported at once,
    before any work starts (`stegopipe plan TARGET` shows them without running). With -m, comma lists
    sweep (`run -m evaluate projection.method=pca,rp projection.dim=4,16 seed=0,1`). An experiment or a
    multirun ends with its results in the report's Table 2 shape (mean ± std over seeds).
    """
    cli_overrides = [f"run.{k}={v}" for k, v in (("executor", executor), ("scheduler", scheduler),
                                                   ("cluster", cluster), ("workers", workers)) if v is not None]
    tasks, targets, cfg, experiment = _plan_target(target, overrides, preset, cli_overrides, None,
                                                   multirun=multirun, report=report)
    only = set(targets) if no_upstream else None
    store = ArtifactStore(cfg.run.root)
    seconds = {t.id: _estimate(t, store)["seconds"] for t in tasks if not runner.is_cached(store, t.id)}
    try:
        done = runner.run_tasks(tasks, cfg.run, force_stages=force_stages, only=only, estimates=seconds,
                                verbose=verbose)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: what finished is kept (artifacts, and the shards of resumable stages); "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    ran = sum(r.status == "ran" for r in done)
    click.echo(f"{len(done)} artifacts ({ran} built, {len(done) - ran} cached) under {cfg.run.root}", err=True)
    if experiment:  # its results: the registered table (the report's Table 2 shape), else one row per configuration
        ids = [t.id for t in tasks]
        table = results.run_table(store, ids) or _result_table(store, ids)[0]
        if table:
            click.echo(table)
    by_id = {r.id: r for r in done}
    for target_id in dict.fromkeys(targets):
        if target_id in by_id:
            click.echo(str(by_id[target_id].path))
    copy_to = experiment.spec.get("copy_to") if experiment else None
    if copy_to and targets and targets[-1] in by_id:
        shutil.copytree(by_id[targets[-1]].path, copy_to, dirs_exist_ok=True)
        click.echo(f"copied {targets[-1]} to {copy_to}/", err=True)


def _estimate(task: planner.Task, store: ArtifactStore) -> dict[str, float | None]:
    """What ``plan`` says a missing artifact will cost: ``bytes`` (a stage's registered estimate) and
    ``seconds`` with its ``basis`` (:mod:`pipeline.estimates`; None: no estimate)."""
    size = registry.ESTIMATES[task.stage](task, store) if task.stage in registry.ESTIMATES else None
    seconds, basis = estimates.estimate_seconds(store, task.stage, task.id, task.params, task.inputs, size)
    return {"bytes": size, "seconds": seconds, "basis": basis}


def _time_text(row: dict[str, Any]) -> str:
    """The TIME cell of a plan row: ``~12s`` estimated (``~12s*`` from ``stegopipe calibrate``), else empty."""
    seconds = (row["estimate"] or {}).get("seconds")
    if seconds is None:
        return ""
    return f"~{duration(seconds)}{'*' if row['estimate'].get('basis') == 'calibration' else ''}"


def plan_rows(tasks: list[planner.Task], store: ArtifactStore) -> list[dict[str, Any]]:
    """One row per task: number, stage, id, status (cached / running / missing, or blocked: a placeholder
    whose id waits for something missing, with ``waits``), size or estimate, input
    numbers, label (with what tells equal labels of a stage apart), params, the lock holder and ``why``:
    for a missing artifact whose stage has cached ones, what differs (:mod:`pipeline.why`); for a cached
    one built under other versions of the numerics packages, which."""
    number = {task.id: n for n, task in enumerate(tasks, 1)}
    explainer = Explainer(store)
    labels = labeller(store, tasks)
    texts = [_with_extra(*pair) for pair in _label_rows(labels, [t.id for t in tasks], [t.stage for t in tasks])]
    rows = []
    for n, (task, text) in enumerate(zip(tasks, texts, strict=True), 1):
        if task.waits:  # a placeholder: its id waits for something missing (planner.PLACEHOLDER)
            rows.append({"n": n, "stage": task.stage, "id": task.id, "status": "blocked", "bytes": None,
                         "estimate": None, "inputs": [number[d] for d in task.inputs.values() if d in number],
                         "label": text, "label_fields": labels.fields(task.id), "params": task.params,
                         "holder": None, "why": None, "waits": task.waits})
            continue
        holder = _lock_holder(store, task.id)
        cached = executor.is_cached(store, task.id)
        rows.append({"n": n, "stage": task.stage, "id": task.id,
                     "status": "cached" if cached else "running" if holder else "missing",
                     "bytes": store.size(task.id) if cached else None,
                     "estimate": None if cached else _estimate(task, store),
                     "inputs": [number[d] for d in task.inputs.values() if d in number],
                     "label": text, "label_fields": labels.fields(task.id), "params": task.params,
                     "holder": holder, "why": explainer.drift(task.id) if cached else explainer.why(task)})
    return rows


@main.command("plan")
@click.argument("target", shell_complete=_complete_targets)
@click.argument("overrides", nargs=-1)
@_PRESET
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: rows, needs, problems, targets.")
@click.option("--wide", is_flag=True, help="Also every param of each artifact (not cut).")
@_MULTIRUN
@_REPORT
def plan_cmd(target: str, overrides: tuple[str, ...], preset: str | None, as_json: bool, wide: bool,
             multirun: bool, report: str | None) -> None:
    """Show what `run TARGET` would do, without running anything (alias: status).

    Every artifact of the DAG in dependency order (inputs as [n]) with its label, cached, missing or
    running (with the lock holder), the size of what exists and an estimate of what is missing, the data
    roots and weights it reads, and every problem at once. Exit status 1 when something blocks the run.
    """
    problems: list[str] = []
    tasks, targets, cfg, _ = _plan_target(target, overrides, preset, [], problems, multirun=multirun, report=report)
    store = ArtifactStore(cfg.run.root)
    rows = plan_rows(tasks, store)
    needs = {(need.what, need.path): need for task in tasks for need in task.needs}
    blocking = list(dict.fromkeys(problems + [need.problem() for need in needs.values() if not need.ok]))
    if as_json:
        click.echo(json.dumps({"target": target, "root": str(store.root), "rows": rows,
                               "needs": [{"what": n.what, "path": n.path, "ok": n.ok, "setting": n.setting}
                                         for n in needs.values()],
                               "problems": blocking, "targets": list(dict.fromkeys(targets))}, indent=2, default=str))
        sys.exit(1 if blocking else 0)
    click.echo(f"plan of {target}: {len(tasks)} artifacts under {store.root}")
    click.echo(f"{'':4} {'STAGE':<11} {'ID':<30} {'STATUS':<8} {'SIZE':>9} {'TIME':>9}  {'INPUTS':<12} LABEL")
    cached_bytes, missing_bytes, unknown = 0, 0, 0
    missing_seconds, untimed = 0.0, 0
    for row in rows:
        if row["status"] == "cached":
            cached_bytes += row["bytes"]
            size_text = human_bytes(row["bytes"])
        elif row["status"] == "blocked":
            size_text = ""
        else:
            estimate = row["estimate"]["bytes"]
            unknown += estimate is None
            missing_bytes += estimate or 0
            size_text = "" if estimate is None else f"~{human_bytes(estimate)}"
        time_text = _time_text(row)
        missing_seconds += (row["estimate"] or {}).get("seconds") or 0.0
        untimed += row["status"] in ("missing", "running") and not time_text
        inputs = ",".join(f"[{d}]" for d in row["inputs"])
        inputs = inputs if len(inputs) <= 12 else f"{len(row['inputs'])} inputs"
        click.echo(f"[{row['n']:>2}] {row['stage']:<11} {row['id']:<30} {row['status']:<8} {size_text:>9} {time_text:>9}  "
                   f"{inputs:<12} {row['label']}{'  ' + params_summary(row['params'], 10_000) if wide else ''}".rstrip())
        if row["holder"]:
            click.echo(f"{'':5}{row['holder']}")
        if row["status"] == "blocked":
            wait = row["waits"][0]
            click.echo(f"{'':5}waits for: {wait if len(wait) <= 110 else wait[:109] + '…'}")
        if row["why"]:
            click.echo(f"{'':5}{'why' if row['status'] == 'missing' else 'note'}: {row['why']}")
    counts = {state: sum(r["status"] == state for r in rows) for state in ("cached", "running", "missing", "blocked")}
    click.echo(f"{counts['cached']} cached ({human_bytes(cached_bytes)}), {counts['running']} running, "
               f"{counts['missing']} missing (about {human_bytes(missing_bytes)}"
               f"{f'; {unknown} without an estimate' if unknown else ''})"
               f"{f', time ~{duration(missing_seconds)} estimated' if missing_seconds else ''}"
               f"{f' ({untimed} without a time estimate: stegopipe calibrate)' if untimed and missing_seconds else ''}"
               + (f", {counts['blocked']} blocked (their ids wait for what is missing below)" if counts["blocked"] else ""))
    for need in needs.values():
        click.echo(f"needs {need.what}: {need.path}  {'ok' if need.ok else 'MISSING (set ' + need.setting + ')'}")
    if blocking:
        click.echo(f"cannot run: {planner.problems_error(blocking)}", err=True)
        sys.exit(1)
    if targets:
        click.echo(f"targets: {' '.join(dict.fromkeys(targets))}")


main.add_command(plan_cmd, "status")


@main.command("adopt")
@click.argument("target", shell_complete=_complete_targets)
@click.argument("overrides", nargs=-1)
@_PRESET
@click.option("--full-below-s", type=float, default=FULL_BELOW_S, show_default=True,
              help="Recompute a stage whole when its cached run took at most this many seconds (else sample shards).")
@click.option("--samples", type=click.IntRange(0), default=SAMPLE_SHARDS, show_default=True,
              help="Shards of a sharded stage recomputed (seeded by the id), besides the last one.")
def adopt_cmd(target: str, overrides: tuple[str, ...], preset: str | None, full_below_s: float, samples: int) -> None:
    """Carry cached results of TARGET's DAG forward to the current code where a recomputed sample is identical.

    For each missing artifact whose stage has a cached one with the same params and inputs but other code,
    recompute the whole stage (when it was quick) or a seeded sample of its shards and the last shard, and
    compare byte for byte: identical files are published under the new id as hard links (the manifest says
    "adopted from ..."); different ones are named and nothing is adopted. Exit status 1 when some differ.
    """
    problems: list[str] = []
    tasks, _, cfg, _ = _plan_target(target, overrides, preset, [], problems)
    if problems:
        raise planner.problems_error(problems)
    store = ArtifactStore(cfg.run.root)
    done = adopt(store, tasks, device=cfg.run.device, full_below_s=full_below_s, samples=samples)
    for result in done:
        if result.status != "cached":
            source = f" from {result.source}" if result.source else ""
            timing = f" ({result.wall_s:.1f} s)" if result.wall_s else ""
            click.echo(f"{result.status:<9} {result.task}{source}: {result.detail}{timing}")
    counts = {status: sum(r.status == status for r in done) for status in ("adopted", "different", "refused", "no-match")}
    click.echo(", ".join(f"{n} {status}" for status, n in counts.items()), err=True)
    sys.exit(1 if counts["different"] else 0)


@main.command("stages")
def stages_cmd() -> None:
    """List the registered stages in pipeline order, their artifact kinds and make targets."""
    _load_plugins()
    click.echo(f"{'STAGE':<12} {'FMT':<5} {'KIND':<10} {'MAKE TARGET':<22} DESCRIPTION")
    for stage in registry.STAGES.values():  # registration order: the plugin registers them in pipeline order
        args = ", ".join(f"{k}={v}" for k, v in stage.args.items())
        click.echo(f"{stage.name:<12} {stage.format_version:<5} {stage.kind:<10} {stage.make_target:<22} "
                   f"{stage.description}{f'  [args: {args}]' if args else ''}")


@main.command("ls")
@click.argument("stage", required=False, shell_complete=_complete_stages)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (with label, params and inputs).")
@click.option("--wide", is_flag=True, help="Also every param (not cut).")
def ls_cmd(stage: str | None, as_json: bool, wide: bool) -> None:
    """List published artifacts (optionally of one STAGE), oldest first, each with its label (dataset,
    backbone, method, dim, seed, ... from its params and lineage); of one STAGE, one column per label field."""
    _load_plugins()
    if stage is not None:
        registry.get_stage(stage)  # an unknown stage is an error (with a "did you mean")
    store = store_from()
    pinned = set(store.pins())
    labels = labeller(store)
    rows = []
    for artifact in store.ids(stage):
        try:
            manifest = store.manifest(artifact)
        except ArtifactError as exc:
            click.echo(f"warning: skipping {artifact}: {exc}", err=True)
            continue
        rows.append({"id": artifact, "stage": manifest.get("stage"), "created": manifest.get("created"),
                     "wall_s": manifest.get("wall_time_s"), "bytes": manifest_bytes(manifest),
                     "pinned": artifact in pinned, "label": labels.text(artifact),
                     "label_fields": labels.fields(artifact), "params": manifest.get("params", {}),
                     "inputs": manifest.get("inputs", {})})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no artifacts under {store.root}", err=True)
        return
    labelled = _label_rows(labels, [r["id"] for r in rows], [r["stage"] for r in rows])
    columns = [c for c in COLUMNS if any(c in r["label_fields"] for r in rows)] if stage else []
    if columns:  # one stage: a column per label field, then what tells equal labels apart
        cells = [[format_cell(c, r["label_fields"].get(c)) for c in columns] for r in rows]
        widths = [max(len(x) for x in col) for col in zip(columns, *cells, strict=True)]
        label_header = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
        shown = ["  ".join(x.ljust(w) for x, w in zip(cell, widths, strict=True)) + (f"  [{more}]" if more else "")
                 for cell, (_, more) in zip(cells, labelled, strict=True)]
    else:
        label_header, shown = "LABEL", [_with_extra(*pair) for pair in labelled]
    click.echo(f"{'ID':<32} {'CREATED':<16} {'WALL':>8} {'SIZE':>9}  {label_header}{'  PARAMS' if wide else ''}".rstrip())
    for row, text in zip(rows, shown, strict=True):
        params = f"  {params_summary(row['params'], 10_000)}" if wide else ""
        click.echo(f"{row['id']:<32} {_when(row['created']):<16} {row['wall_s'] or 0:>7.1f}s "
                   f"{human_bytes(row['bytes']):>9}  {'[pinned] ' if row['pinned'] else ''}{text}{params}".rstrip())
    click.echo(f"{len(rows)} artifacts, {human_bytes(sum(r['bytes'] for r in rows))} under {store.root}", err=True)


@main.command("show")
@click.argument("artifact", shell_complete=_complete_ids)
@click.option("--json", "as_json", is_flag=True, help="The whole manifest (files, packages, code version, ...).")
def show_cmd(artifact: str, as_json: bool) -> None:
    """Summarise an artifact (id or unique prefix): stage, key params, inputs, size, wall time, status."""
    store = store_from()
    artifact = store.resolve(artifact)
    manifest = store.manifest(artifact)
    if as_json:
        labels = labeller(store)
        click.echo(json.dumps({**manifest, "path": str(store.path(artifact)), "label": labels.text(artifact),
                               "label_fields": labels.fields(artifact)}, indent=2, sort_keys=True))
        return
    status = "published" if executor.is_cached(store, artifact) else "INCOMPLETE (files missing; rebuilt on the next run)"
    if artifact in store.pins():
        status += ", pinned"
    holder = store.in_use().get(artifact)
    if holder:
        status += f", read by the running stage of {holder}"
    files = manifest.get("files", [])
    labels = labeller(store)
    lines = [("id", artifact), ("label", labels.text(artifact) or "-"),
             ("stage", f"{manifest.get('stage')} ({manifest.get('kind')})"),
             ("status", status), ("params", params_summary(manifest.get("params", {}), 100))]
    for name, dep in manifest.get("inputs", {}).items():
        lines.append(("input", f"{name}: {dep}  {labels.text(dep) if store.exists(dep) else '(missing)'}".rstrip()))
    lines += [("size", f"{human_bytes(manifest_bytes(manifest))} in {len(files)} files"),
              ("wall time", f"{manifest.get('wall_time_s', 0):.1f}s on {manifest.get('host')} "
                            f"({manifest.get('device')}), {_when(manifest.get('created'))}")]
    if manifest.get("headline"):
        lines.append(("result", manifest["headline"]))
    if manifest.get("skipped"):
        lines.append(("skipped", f"{len(manifest['skipped'])} bad inputs (--json lists them)"))
    lines.append(("path", str(store.path(artifact))))
    if any(entry["path"] == executor.LOG_FILE for entry in files):
        lines.append(("log", str(store.path(artifact) / executor.LOG_FILE)))
    for key, value in lines:
        click.echo(f"{key:<10} {value}")


def _result_table(store: ArtifactStore, ids: list[str], *, pool: bool = True, fmt: str = "table",
                  conditions: tuple[str, ...] = (), sort_by: str | None = None) -> tuple[str | None, str]:
    """The results among ``ids`` (artifacts that record a summary), pooled over seeds unless ``pool`` is
    False, rendered as ``fmt`` (None when there are none), and a note of how many of them exist."""
    manifest_of = manifest_reader(store)
    labels = labeller(store, (), manifest_of)
    rows = results.artifact_rows(manifest_of, ids, labels)
    stages = {stage_of(r.ids[0]) for r in rows}
    planned = sum(stage_of(a) in stages for a in ids)
    note = f"{len(rows)} of {planned} planned {'/'.join(sorted(stages))} artifacts exist" if len(rows) < planned else ""
    if pool:
        rows = results.aggregate(rows, labels)
    else:
        results.distinguish(rows, labels)
    rows = results.sort(results.where(rows, conditions), sort_by)
    return (results.render(rows, fmt, per_artifact=not pool) if rows else None), note


@main.command("results")
@click.argument("targets", nargs=-1, shell_complete=_complete_targets)
@click.option("--where", "conditions", multiple=True, metavar="KEY=VALUE",
              help="Only rows whose label has this value (repeatable), e.g. method=pca, dim=16, crf=true.")
@click.option("--sort", "sort_by", metavar="KEY", help="A metric (best first, e.g. cluster_crf_miou) or a column.")
@click.option("--format", "fmt", type=click.Choice(results.FORMATS), default="table", show_default=True)
@click.option("--each", is_flag=True, help="One row per artifact, also for an experiment (no pooling over seeds).")
def results_cmd(targets: tuple[str, ...], conditions: tuple[str, ...], sort_by: str | None, fmt: str,
                each: bool) -> None:
    """Compare results across runs: one row per evaluation (every one under the root, or the given ids /
    prefixes), or for an EXPERIMENT one row per configuration, mean ± std over its seeds (n = seeds).

    Columns: the label fields (dataset, backbone, method, dim, seed, CRF, ...) and the headline metrics
    (linear/cluster mIoU and accuracy, with and without CRF). Reads manifests only.
    """
    store = store_from()
    _load_plugins()
    experiments = [t for t in targets if t not in store.ids() and experiment_path(t)]
    ids = [store.resolve(t) for t in targets if t not in experiments]
    for name in experiments:
        ids += [t.id for t in Experiment.load(name).plan()[0]]
    text, note = _result_table(store, ids or store.ids(), pool=bool(experiments) and not each, fmt=fmt,
                               conditions=conditions, sort_by=sort_by)
    if text is None:
        click.echo(f"no results{' of ' + ', '.join(targets) if targets else ''}"
                   f"{' matching ' + ' '.join(conditions) if conditions else ''} under {store.root}", err=True)
    else:
        click.echo(text)
    if note:
        click.echo(note, err=True)


@main.command("experiments")
def experiments_cmd() -> None:
    """List the experiments: artifacts planned, how many are cached and their size (or why one cannot be
    planned here)."""
    _load_plugins()
    store = store_from()
    click.echo(f"{'EXPERIMENT':<14} {'ARTIFACTS':>9} {'CACHED':>7} {'SIZE':>9}  DESCRIPTION")
    for name in experiment_names():
        experiment = Experiment.load(name)
        problems: list[str] = []
        tasks, _ = experiment.plan(problems=problems)
        description = " ".join(str(experiment.spec.get("description") or "").split())
        description = description if len(description) <= 60 else description[:59] + "…"
        if problems:
            click.echo(f"{name:<14} {'?':>9} {'':>7} {'':>9}  {description}")
            click.echo(f"{'':<14} cannot be planned here: {problems[0]}")
            continue
        cached = [t.id for t in tasks if executor.is_cached(store, t.id)]
        click.echo(f"{name:<14} {len(tasks):>9} {len(cached):>7} {human_bytes(sum(map(store.size, cached))):>9}  "
                   f"{description}")


@main.command("verify")
@click.argument("artifacts", nargs=-1, shell_complete=_complete_ids)
@click.option("--verbose", "-v", is_flag=True, help="Also one line per intact artifact.")
def verify_cmd(artifacts: tuple[str, ...], verbose: bool) -> None:
    """Re-hash artifact files against their manifests (all artifacts if none given): a line per damaged
    one and a summary. Exit 1 on damage."""
    store = store_from()
    ids = [store.resolve(a) for a in artifacts] or store.ids()
    bad = rehashed = 0
    for artifact in ids:
        problems = store.verify(artifact)
        bad += bool(problems)
        if problems or verbose:
            click.echo(f"{'BAD ' if problems else 'ok  '} {artifact}")
        for problem in problems:
            click.echo(f"     {problem}")
        try:
            rehashed += store.size(artifact)
        except ArtifactError:  # an unreadable manifest (reported above) lists no files to count
            pass
    total = human_bytes(rehashed)
    if bad:
        click.echo(f"{bad} of {len(ids)} artifacts are damaged ({total} re-hashed)", err=True)
        sys.exit(1)
    click.echo(f"{len(ids)} artifacts verified, all intact ({total} re-hashed)", err=True)


@main.command("pin")
@click.argument("artifacts", nargs=-1, required=True, shell_complete=_complete_ids)
def pin_cmd(artifacts: tuple[str, ...]) -> None:
    """Protect artifacts (ids or unique prefixes) and their inputs from gc (listed in <root>/.pins)."""
    store = store_from()
    for artifact in (store.resolve(a) for a in artifacts):
        click.echo(f"{'pinned' if store.set_pinned(artifact, True) else 'already pinned'} {artifact}")


@main.command("unpin")
@click.argument("artifacts", nargs=-1, required=True, shell_complete=_complete_ids)
def unpin_cmd(artifacts: tuple[str, ...]) -> None:
    """Let gc delete artifacts pinned with `stegopipe pin` again (when nothing else keeps them)."""
    store = store_from()
    pinned = store.pins()
    for text in artifacts:
        artifact = text if text in pinned else store.resolve(text)
        click.echo(f"{'unpinned' if store.set_pinned(artifact, False) else 'not pinned'} {artifact}")


@main.command("gc")
@click.option("--experiment", "--keep-experiment", "experiments", multiple=True, shell_complete=_complete_targets,
              help="Keep the artifacts of this experiment (repeatable); only the named experiments are "
                   "planned. Default: every experiment in configs/experiments, and --yes refuses while "
                   "any of them cannot be planned here.")
@click.option("--keep", multiple=True, help="Also keep this artifact id and its inputs (repeatable).")
@click.option("--yes", is_flag=True, help="Really delete (default is a dry run).")
def gc_cmd(experiments: tuple[str, ...], keep: tuple[str, ...], yes: bool) -> None:
    """Delete artifacts that no experiment, pin (`stegopipe pin`) or --keep id references, and the staging
    folders of runs that are gone. Dry run unless --yes. Inputs and outputs of running stages are kept."""
    store = store_from()
    kept: set[str] = {store.resolve(k) for k in keep}
    unplanned: dict[str, str] = {}
    _load_plugins()  # stages, and the experiment folders the plugins register
    for name in experiments or experiment_names():
        problems: list[str] = []
        tasks, _ = Experiment.load(name).plan(problems=problems, placeholders=False)  # no id: nothing to keep
        if problems:
            if experiments:  # named explicitly: it must be plannable
                raise planner.problems_error(problems)
            unplanned[name] = problems[0]
        kept |= {t.id for t in tasks}
    if unplanned:
        click.echo(f"note: {len(unplanned)} experiments cannot be planned here ({', '.join(unplanned)}; "
                   f"`stegopipe plan NAME` says why), so their artifacts are not protected", err=True)
        if yes:
            raise StegopipeError(
                f"refusing to delete: experiments {', '.join(unplanned)} cannot be planned here, so their "
                "artifacts would be deleted too; name the experiments to keep with --experiment NAME "
                "(repeatable) or pin what to keep with `stegopipe pin ID`")
    report = store.gc(kept, dry_run=not yes)
    verb = "deleted" if yes else "would delete"
    for artifact, size in report.sizes.items():
        click.echo(f"{verb} {artifact:<32} {human_bytes(size):>9}")
    for artifact in report.staging:
        click.echo(f"{verb} staging folder {artifact} (its run is gone)")
    for artifact, holder in report.in_use.items():
        click.echo(f"kept {artifact}: in use by the running stage of {holder}", err=True)
    for artifact, reason in report.unreadable.items():
        click.echo(f"warning: kept {artifact} and every artifact its manifest names: {reason}", err=True)
    click.echo(f"{len(report.artifacts)} unreferenced artifacts, {len(report.staging)} stale staging folders, "
               f"{report.bytes / 1e6:.1f} MB {'freed' if yes else 'to free (dry run; --yes to delete)'}", err=True)


@main.command("config")
@click.argument("preset", required=False)
@click.argument("overrides", nargs=-1)
def config_cmd(preset: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config of PRESET with OVERRIDES applied, after the checks every plan makes: the
    declared choices and ranges of every section (`head.steps=-5` is refused), every problem at once."""
    if preset and "=" in preset:
        overrides, preset = (preset, *overrides), None
    _load_plugins()
    cfg = load_config(preset, list(overrides))
    tree = to_container(cfg)
    problems = []
    for section in SECTIONS:
        try:
            check_section(section, get_path(tree, section))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise planner.problems_error(problems)
    click.echo(to_yaml(cfg), nl=False)


if __name__ == "__main__":  # `python -m pipeline.cli`: run the importable module, where plugins add commands
    from pipeline import cli

    cli.main()
