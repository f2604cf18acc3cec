"""Import a released STEGO checkpoint (method.md §11) as a ``train-head`` artifact: ``stegopipe import-stego``.

The conversion is :func:`stages.projections.stego.write_imported` (the checkpoint read with
:func:`stages.stego.checkpoint.read_stego_checkpoint`, a restricted unpickler), which the ``train-head``
stage runs for ``head.checkpoint``; this module is the command. The artifact holds the head weights, the
head as a projection, the trained probes and the checkpoint's stored STEGO config (``stego_cfg.json``,
also recorded in the manifest). Its params are only the file's sha256 and it has no inputs, so its id is
``artifact_id("train-head", <its code>, {"imported": sha256}, {})``: the same file gives the same artifact
whether it comes from ``stegopipe import-stego FILE`` or from ``head.checkpoint=FILE`` in a config.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.cli import register_command
from pipeline.paths import LocalPath


@register_command
@click.command("import-stego")
@click.argument("checkpoint", type=LocalPath(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--preset", "-p", help="Config preset (only run.* settings matter here).")
@click.option("--ignore-unknown-keys", is_flag=True, help="Import even if the state dict has unknown keys.")
def import_stego_cmd(checkpoint: Path, overrides: tuple[str, ...], preset: str | None,
                     ignore_unknown_keys: bool) -> None:
    """Import a released STEGO .ckpt as a train-head artifact (content-addressed by the file's sha256).

    Prints the artifact id; use the file in experiments with head.checkpoint=CHECKPOINT.
    """
    from pipeline import planner, runner
    from pipeline.config import load_config

    cfg = load_config(preset, list(overrides))
    cfg.head.checkpoint = os.fspath(checkpoint.expanduser().resolve())
    cfg.head.checkpoint_ignore_unknown = ignore_unknown_keys
    tasks, targets = planner.plan([planner.Request("train-head", cfg)])
    results = runner.run_tasks(tasks, cfg.run)
    done = {r.id: r for r in results}[targets[0]]
    click.echo(f"{'imported' if done.status == 'ran' else 'already imported'}: {done.path}", err=True)
    click.echo(done.id)
