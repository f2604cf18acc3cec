"""``stegopipe methods``: the registered projection methods (``projection.method`` values), from the registry."""
from __future__ import annotations

import click

from pipeline.cli import register_command
from pipeline.registry import load_plugins, plugin_names


@register_command
@click.command("methods")
def methods_cmd() -> None:
    """List the projection methods (projection.method=NAME): the stage that provides each, its label in
    reports and the config fields only it reads; plugins (STEGOPIPE_PLUGINS) add theirs."""
    load_plugins(plugin_names())
    from stages.projections.methods import methods

    click.echo(f"{'NAME':<10} {'PROVIDED BY':<12} {'LABEL':<10} OWN FIELDS")
    for m in methods():
        own = ", ".join((*m.fields, *((f"{m.section[0]}.*",) if m.section else ()))) or "-"
        beyond = "  (beyond the paper)" if not m.paper else ""
        click.echo(f"{m.name:<10} {m.stage or '-':<12} {m.label:<10} {own}{beyond}")
