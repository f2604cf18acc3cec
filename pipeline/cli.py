"""The ``stegopipe`` command line (click).

Stage plugins (``STEGOPIPE_PLUGINS``, default ``stages.plugin``) are imported before a command runs; they
register stages, config sections and extra commands (:func:`register_command`). Errors of the
:class:`StegopipeError` family print as one line and exit with status 2 (``--debug`` shows the
traceback).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any

if "--quiet" in sys.argv[1:]:  # tqdm reads TQDM_* when it is imported: hide progress bars before that
    os.environ.setdefault("TQDM_DISABLE", "1")

import click  # noqa: E402

from pipeline import runner
from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config, parse_override, to_yaml
from pipeline.errors import StegopipeError
from pipeline.experiments import Experiment, experiment_names, experiment_path

EXTRA_COMMANDS: list[click.Command] = []


def register_command(command: click.Command) -> click.Command:
    """Let a plugin add a subcommand (e.g. ``export-squirrel``)."""
    EXTRA_COMMANDS.append(command)
    return command


class PluginGroup(click.Group):
    """A click group that imports the stage plugins before listing or resolving commands."""

    def _load(self) -> None:
        runner.load_plugins(runner.plugin_names())
        for command in EXTRA_COMMANDS:
            if command.name not in self.commands:
                self.add_command(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StegopipeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


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


def store_from(preset: str | None = None, overrides: tuple[str, ...] = ()) -> ArtifactStore:
    return ArtifactStore(load_config(preset, [o for o in overrides if o.startswith("run.")]).run.root)


# --------------------------------------------------------------------------------------------------


@main.command("run")
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option("--preset", "-p", help="Config preset (configs/datasets/<name>.yaml or a YAML path).")
@click.option("--force", "force_stages", multiple=True, help="Re-run this stage even if cached (repeatable).")
@click.option("--no-upstream", is_flag=True, help="Run only TARGET; fail if an input artifact is missing.")
@click.option("--executor", type=click.Choice(["auto", "local", "dask"]), help="Override run.executor.")
@click.option("--scheduler", help="Address of an existing Dask scheduler (tcp://host:port).")
@click.option("--cluster", type=click.Choice(["local", "slurm"]), help="Dask cluster to start.")
@click.option("--workers", type=int, help="Dask LocalCluster workers (default: one per core).")
def run_cmd(target: str, overrides: tuple[str, ...], preset: str | None, force_stages: tuple[str, ...],
            no_upstream: bool, executor: str | None, scheduler: str | None, cluster: str | None,
            workers: int | None) -> None:
    """Build TARGET (a stage or an experiment) and everything it needs that is not cached.

    OVERRIDES are dotted config keys (head.dim=90 dataset.root=/data/coco) and stage arguments
    (split=val).
    """
    cli_overrides = [f"run.{k}={v}" for k, v in (("executor", executor), ("scheduler", scheduler),
                                                   ("cluster", cluster), ("workers", workers)) if v is not None]
    experiment = None
    if target in runner.STAGES:
        stage = runner.get_stage(target)
        args = {}
        config_overrides = []
        for text in overrides:
            key, value = parse_override(text)
            if key in stage.args:
                args[key] = value
            else:
                config_overrides.append(text)
        cfg = load_config(preset, config_overrides + cli_overrides)
        tasks, targets = runner.plan([runner.Request(target, cfg, args)])
    elif experiment_path(target):
        experiment = Experiment.load(target)
        cfg = load_config(experiment.spec.get("preset") or preset,
                          list(experiment.spec.get("overrides") or []) + list(overrides) + cli_overrides)
        tasks, targets = experiment.plan(list(overrides) + cli_overrides)
    else:
        raise StegopipeError(f"'{target}' is neither a stage ({', '.join(sorted(runner.STAGES))}) "
                             f"nor an experiment ({', '.join(experiment_names())})")
    only = set(targets) if no_upstream else None
    results = runner.run_tasks(tasks, cfg.run, force_stages=force_stages, only=only)
    ran = sum(r.status == "ran" for r in results)
    click.echo(f"{len(results)} artifacts ({ran} built, {len(results) - ran} cached) under {cfg.run.root}", err=True)
    by_id = {r.id: r for r in results}
    for target_id in dict.fromkeys(targets):
        if target_id in by_id:
            click.echo(str(by_id[target_id].path))
    copy_to = experiment.spec.get("copy_to") if experiment else None
    if copy_to and targets and targets[-1] in by_id:
        shutil.copytree(by_id[targets[-1]].path, copy_to, dirs_exist_ok=True)
        click.echo(f"copied {targets[-1]} to {copy_to}/", err=True)


@main.command("stages")
def stages_cmd() -> None:
    """List the registered stages, their artifact kinds and make targets."""
    for stage in sorted(runner.STAGES.values(), key=lambda s: s.name):
        args = ", ".join(f"{k}={v}" for k, v in stage.args.items())
        click.echo(f"{stage.name:<12} v{stage.version:<4} -> {stage.kind:<10} {stage.make_target:<22} "
                   f"{stage.description}{f'  [args: {args}]' if args else ''}")


@main.command("ls")
@click.argument("stage", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(stage: str | None, as_json: bool) -> None:
    """List published artifacts (optionally of one STAGE)."""
    store = store_from()
    rows = []
    for artifact in store.ids(stage):
        manifest = store.manifest(artifact)
        size = sum(f["size"] for f in manifest.get("files", []))
        rows.append({"id": artifact, "stage": manifest.get("stage"), "created": manifest.get("created"),
                     "wall_s": manifest.get("wall_time_s"), "bytes": size})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no artifacts under {store.root}", err=True)
    for row in rows:
        click.echo(f"{row['id']:<34} {row['created'] or '':<26} {row['wall_s'] or 0:>8.1f}s {row['bytes'] / 1e6:>10.2f} MB")


def _print_lineage(node: dict[str, Any], indent: int = 0, name: str = "") -> None:
    label = f"{name}: " if name else ""
    click.echo(f"{'  ' * indent}{label}{node['id']}{' (missing)' if node.get('missing') else ''}")
    for child_name, child in node.get("inputs", {}).items():
        _print_lineage(child, indent + 1, child_name)


@main.command("show")
@click.argument("artifact")
@click.option("--files", is_flag=True, help="Also list files with sizes and checksums.")
def show_cmd(artifact: str, files: bool) -> None:
    """Pretty-print an artifact's manifest (id or unique prefix) and its lineage."""
    store = store_from()
    artifact = store.resolve(artifact)
    manifest = store.manifest(artifact)
    shown = {k: v for k, v in manifest.items() if files or k != "files"}
    click.echo(json.dumps(shown, indent=2, sort_keys=True))
    click.echo(f"path: {store.path(artifact)}")
    click.echo("lineage:")
    _print_lineage(store.lineage(artifact), 1)


@main.command("verify")
@click.argument("artifacts", nargs=-1)
def verify_cmd(artifacts: tuple[str, ...]) -> None:
    """Re-hash artifact files against their manifests (all artifacts if none given). Exit 1 on damage."""
    store = store_from()
    ids = [store.resolve(a) for a in artifacts] or store.ids()
    bad = 0
    for artifact in ids:
        problems = store.verify(artifact)
        bad += bool(problems)
        click.echo(f"{'BAD ' if problems else 'ok  '} {artifact}")
        for problem in problems:
            click.echo(f"     {problem}")
    if bad:
        click.echo(f"{bad} of {len(ids)} artifacts are damaged", err=True)
        sys.exit(1)


@main.command("gc")
@click.option("--experiment", "experiments", multiple=True,
              help="Experiments whose artifacts to keep (default: every experiment in configs/experiments).")
@click.option("--keep", multiple=True, help="Also keep this artifact id and its inputs (repeatable).")
@click.option("--yes", is_flag=True, help="Really delete (default is a dry run).")
def gc_cmd(experiments: tuple[str, ...], keep: tuple[str, ...], yes: bool) -> None:
    """Delete artifacts that no experiment (and no --keep id) references, and the staging folders of runs
    that are gone. Dry run unless --yes. Inputs and outputs of running stages are kept."""
    store = store_from()
    kept: set[str] = {store.resolve(k) for k in keep}
    unplanned = []
    for name in experiments or experiment_names():
        try:
            tasks, _ = Experiment.load(name).plan()
        except StegopipeError as exc:
            if experiments:  # named explicitly: it must be plannable
                raise
            unplanned.append(name)
            click.echo(f"note: experiment {name} cannot be planned here ({exc}); its artifacts are not protected",
                       err=True)
            continue
        kept |= {t.id for t in tasks}
    if yes and unplanned:
        raise StegopipeError(f"refusing to delete: experiments {', '.join(unplanned)} cannot be planned here, so "
                             "their artifacts would be deleted too; name the experiments to keep with --experiment")
    report = store.gc(kept, dry_run=not yes)
    verb = "deleted" if yes else "would delete"
    for artifact in report.artifacts:
        click.echo(f"{verb} {artifact}")
    for artifact in report.staging:
        click.echo(f"{verb} staging folder {artifact} (its run is gone)")
    for artifact, holder in report.in_use.items():
        click.echo(f"kept {artifact}: in use by the running stage of {holder}", err=True)
    click.echo(f"{len(report.artifacts)} unreferenced artifacts, {len(report.staging)} stale staging folders, "
               f"{report.bytes / 1e6:.1f} MB {'freed' if yes else 'to free (dry run; --yes to delete)'}", err=True)


@main.command("config")
@click.argument("preset", required=False)
@click.argument("overrides", nargs=-1)
def config_cmd(preset: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config of PRESET with OVERRIDES applied."""
    if preset and "=" in preset:
        overrides, preset = (preset, *overrides), None
    click.echo(to_yaml(load_config(preset, list(overrides))), nl=False)


if __name__ == "__main__":
    main()
