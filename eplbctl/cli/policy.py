"""``eplbctl policy``: the placement policies this installation knows (local registry, no daemon)."""

from __future__ import annotations

import click
from rich.table import Table

from eplbctl.cli.base import handle_errors, json_option
from eplbctl.cli.output import Terminal


@click.group()
def policy() -> None:
    """Placement policies."""


@policy.command("list")
@json_option
@handle_errors
def list_command(as_json: bool) -> None:
    """List the placement policies and their parameters."""
    # The registry imports numpy/numba: only this command pays for it.
    from eplbctl.policies import list_policies

    policies = list_policies()
    term = Terminal()
    if as_json:
        term.json({"policies": policies})
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("policy")
    table.add_column("summary")
    table.add_column("parameters (--param key=value)")
    for entry in policies:
        params = ", ".join(f"{p['name']}={p['default']} ({p['type']})" for p in entry["params"]) or "-"
        table.add_row(entry["name"], entry["summary"], params)
    term.table(table)
