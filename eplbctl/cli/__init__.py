"""``eplbctl``: the operator's command line. One module per command group; shared pieces in base.py.

Importing this package must stay cheap (click + rich only): the modules below import numpy, the
policies, ZeroMQ or the heat readers inside their commands, never at import time.
"""

from __future__ import annotations

from pathlib import Path

import click

from eplbctl import __version__
from eplbctl.cli.base import DEFAULT_TIMEOUT_S, CliContext, EplbGroup, check_timeout


@click.group(cls=EplbGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--endpoint",
    envvar="EPLBCTL_ENDPOINT",
    metavar="URL",
    help="Daemon control endpoint (ipc://PATH or tcp://HOST:PORT); default: the local daemon's socket.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=DEFAULT_TIMEOUT_S,
    callback=check_timeout,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for each reply of the daemon.",
)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="HMAC key shared with the daemon (required for tcp:// endpoints).",
)
@click.version_option(__version__, prog_name="eplbctl")
@click.pass_context
def main(ctx: click.Context, endpoint: str | None, timeout_s: float, key_file: Path | None) -> None:
    """Query and steer expert-parallel load balancing (EPLB) of a running MoE deployment.

    Layers are numbered by MoE layer index (0..L-1) everywhere.
    """
    ctx.obj = CliContext(endpoint=endpoint, timeout_s=timeout_s, key_file=key_file)


def _register() -> None:
    # Late imports keep the command modules free to import `main`'s context helpers from base.py.
    from eplbctl.cli.completion import completion
    from eplbctl.cli.demo import demo, shutdown, verify
    from eplbctl.cli.plan import plan
    from eplbctl.cli.policy import policy
    from eplbctl.cli.profile import profile
    from eplbctl.cli.rebalance import rebalance
    from eplbctl.cli.status import status

    for command in (status, rebalance, profile, verify, shutdown, policy, plan, demo, completion):
        main.add_command(command)


_register()

__all__ = ["main"]
