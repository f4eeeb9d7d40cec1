"""The terminal and the number formats every command prints with.

hatch-style: rich for people on stderr (progress, spinners, notes), the data the user asked for on
stdout (tables), and plain JSON only on stdout under ``--json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.table import Table


class Terminal:
    """hatch-style output: data on stdout, people-facing chatter on stderr, no markup on data."""

    def __init__(self) -> None:
        # Resolved per call (not at import) so click's CliRunner, which swaps sys.stdout, sees it all.
        self.out = Console(file=sys.stdout, **_console_options(sys.stdout))
        self.err = Console(file=sys.stderr, **_console_options(sys.stderr))

    def table(self, table: Table) -> None:
        if self.out.is_terminal:
            self.out.print(table)
            return
        # Off a terminal (pipes, files): rich pads every cell to the column width; strip the trailing
        # blanks so `grep`/`awk`/diffs see clean rows.
        with self.out.capture() as captured:
            self.out.print(table)
        click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))

    def line(self, text: str = "") -> None:
        # Plain echo: data lines must not be re-wrapped or styled by rich.
        click.echo(text)

    def note(self, text: str) -> None:
        click.echo(text, err=True)

    def warn(self, text: str) -> None:
        click.echo(f"eplbctl: warning: {text}", err=True)

    def json(self, obj: Any, compact: bool = False) -> None:
        # compact: one document per line, for streams (``status --watch --json``).
        indent = None if compact else 2
        click.echo(json.dumps(obj, indent=indent, sort_keys=True, default=_json_default))

    @contextmanager
    def spinner(self, text: str) -> Iterator[None]:
        with self.err.status(text):
            yield


def _console_options(stream: Any) -> dict[str, Any]:
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    # Off a terminal: no colour, no markup/highlighting and a wide line, so pipes get plain unwrapped rows.
    if is_tty:
        return {"highlight": False}
    return {"highlight": False, "no_color": True, "width": 200, "force_terminal": False}


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays reach here from the offline planner; the daemon path is plain Python.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def fmt_ratio(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def fmt_summary(name: str, summary: Any) -> str:
    if not isinstance(summary, dict):
        return f"{name} -"
    return f"{name} mean {fmt_ratio(summary.get('mean'))} p90 {fmt_ratio(summary.get('p90'))} " + (
        f"max {fmt_ratio(summary.get('max'))}"
    )
