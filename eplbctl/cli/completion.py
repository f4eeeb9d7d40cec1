"""``eplbctl completion SHELL``: click 8's own completion script, generated in-process (never hand-written).

The output is exactly what ``_EPLBCTL_COMPLETE=bash_source eplbctl`` prints; ``completions/generate.py``
writes the same scripts into the repository for packagers.
"""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")
PROG_NAME = "eplbctl"
COMPLETE_VAR = "_EPLBCTL_COMPLETE"


def completion_source(shell: str) -> str:
    """The completion script of ``shell`` for the ``eplbctl`` group."""
    from click.shell_completion import get_completion_class

    from eplbctl.cli import main

    cls = get_completion_class(shell)
    if cls is None:  # unreachable through the Choice below; kept for direct callers
        raise ValueError(f"no completion support for shell {shell!r}")
    return cls(main, {}, PROG_NAME, COMPLETE_VAR).source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script (e.g. eplbctl completion bash > /etc/bash_completion.d/eplbctl)."""
    click.echo(completion_source(shell))
