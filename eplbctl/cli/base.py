"""What every command shares: the context object, global options, exit codes, errors.

Shaped after Celery's ``cli/base.py`` and hatch's ``Terminal``:
- one context object (:class:`CliContext`) built by the group from ``--endpoint``/``--timeout``/
  ``--key-file`` and handed to every command, which asks it for a client;
- one exception (:class:`CliError`) that carries its exit code, and one translation function
  (:func:`translate`) from client/value errors to a one-line ``eplbctl: error: ...`` on stderr;
- one :class:`~eplbctl.cli.output.Terminal` (in ``output.py``, with the number formats).

Nothing here imports torch, numpy or the policies: every command that talks to a daemon must start fast.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes: LSB for `status`, sysexits(3) elsewhere, click's 2 for usage errors.
EXIT_OK = 0
EXIT_FAILURE = 1  # the operation ran and failed (a job failed, a demo check failed) or the user aborted
EXIT_USAGE = 2  # bad command line (click's own code), bad layer spec, bad --param
EXIT_NOT_RUNNING = 3  # LSB "program is not running" (status only)
EXIT_UNKNOWN = 4  # LSB "program or service status is unknown" (status only)
EXIT_DATAERR = 65  # EX_DATAERR: an input file holds bad data
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: no daemon answers on the endpoint
EXIT_SOFTWARE = 70  # EX_SOFTWARE: the daemon (or this tool) failed internally
EXIT_PROTOCOL = 76  # EX_PROTOCOL: the daemon answered something this version does not understand
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

DEFAULT_TIMEOUT_S = 10.0
MAX_COUNT = 2**31 - 1  # counts sent to the daemon (--last, --top) must fit its protocol's integers
MAX_TIMEOUT_S = 86400.0  # a day: a longer wait on one reply is a typo, and zmq's poll overflows on inf

# The registry's built-in names (eplbctl.policies.REGISTRY, checked by a test): shell completion must
# not import the policies, which load numba.
BUILTIN_POLICIES = ("default", "exact", "flashlb", "random", "swift")
POLICY_ENTRY_POINTS = "eplbctl.policies"


class CliError(click.ClickException):
    """A user-facing failure: one line on stderr and an exit code, never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"eplbctl: error: {shorten(_one_line(self.format_message()))}", err=True)


class EplbGroup(click.Group):
    """The top-level group: every usage error is one line, ``eplbctl: error: ...``, exit 2.

    Click's standalone mode prints usage, a "Try ... --help" hint and "Error: ..." (3-4 lines); we run
    click non-standalone and print the errors ourselves. ``--help`` and bare ``eplbctl`` still print help.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `eplbctl` / `eplbctl policy`: the help
            click.echo(exc.format_message())  # stdout, exit 0: asking for the menu is no mistake (click 8.2+: 2)
            sys.exit(EXIT_OK)
        except click.UsageError as exc:
            click.echo(f"eplbctl: error: {shorten(_one_line(exc.format_message()))}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            interrupted = isinstance(exc.__context__, KeyboardInterrupt)
            click.echo(f"eplbctl: error: {'interrupted' if interrupted else 'aborted'}", err=True)
            sys.exit(EXIT_INTERRUPTED if interrupted else EXIT_FAILURE)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def translate(exc: BaseException, *, not_running: int | None = None, unknown: int | None = None) -> CliError:
    """Map an error from the client, the local libraries or the reply shape to a :class:`CliError`.

    ``not_running``/``unknown`` let `status` use its LSB codes (3 and 4) instead of sysexits.
    The client's errors carry their own exit code (``.exit_code``); we keep it unless told otherwise.
    """
    if isinstance(exc, CliError):
        return exc
    message = _one_line(str(exc)) or type(exc).__name__
    if _is_client_error(exc):
        from eplbctl.client import DaemonUnavailable

        if isinstance(exc, DaemonUnavailable):
            return CliError(message, not_running if not_running is not None else _code(exc, EXIT_UNAVAILABLE))
        if _code(exc, 0) == EXIT_USAGE:  # an endpoint ZeroMQ cannot parse: not a daemon state
            return CliError(message, EXIT_USAGE)
        if getattr(exc, "content", {}).get("deployment_failed"):  # permanent: retrying (75) cannot help
            return CliError(message, unknown if unknown is not None else EXIT_FAILURE)
        return CliError(message, unknown if unknown is not None else _code(exc, EXIT_SOFTWARE))
    if isinstance(exc, UnexpectedReply):
        return CliError(message, unknown if unknown is not None else EXIT_PROTOCOL)
    if isinstance(exc, ValueError):
        return CliError(message, EXIT_DATAERR)
    return CliError(message, EXIT_SOFTWARE)


def _is_client_error(exc: BaseException) -> bool:
    # If eplbctl.client was never imported, nothing raised a ClientError: no need to load ZeroMQ to check.
    client = sys.modules.get("eplbctl.client")
    return client is not None and isinstance(exc, client.ClientError)


def _code(exc: BaseException, default: int) -> int:
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) and code > 0 else default


def _one_line(text: str) -> str:
    # A multi-line message would break `eplbctl ... 2>&1 | tail -1` style scripting.
    return " ".join(text.split())


MAX_MESSAGE_CHARS = 400


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Cut a message that would list thousands of slots or values: an error is read, not parsed."""
    return text if len(text) <= limit else text[: limit - 4].rstrip() + " ..."


class UnexpectedReply(Exception):
    """The daemon's reply lacks a field the protocol promises (so its state is unknown to us)."""


def field(content: dict[str, Any], *keys: str) -> Any:
    """``content[k1][k2]...``, raising :class:`UnexpectedReply` naming the missing path."""
    value: Any = content
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise UnexpectedReply(f"unexpected reply from the daemon: no '{'.'.join(keys[: depth + 1])}'")
        value = value[key]
    return value


@dataclass
class CliContext:
    """Global options, resolved lazily so that `eplbctl policy list` never touches the endpoint."""

    endpoint: str | None
    timeout_s: float
    key_file: Path | None

    def resolved_endpoint(self) -> str:
        from eplbctl.endpoint import resolve_endpoint

        try:
            return resolve_endpoint(self.endpoint)
        except ValueError as exc:  # a malformed endpoint: the user's mistake
            raise CliError(_one_line(str(exc)), EXIT_USAGE) from exc

    def key(self) -> bytes | None:
        if self.key_file is None:
            return None
        from eplbctl.signing import read_key

        try:
            return read_key(self.key_file)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None

    def client(self) -> Any:
        from eplbctl.client import Client

        endpoint = self.resolved_endpoint()
        key = self.key()
        if endpoint.startswith("tcp://") and key is None:  # the daemon refuses tcp without a key
            raise CliError(f"a tcp:// endpoint needs --key-file (the HMAC key of the daemon at {endpoint})",
                           EXIT_USAGE)
        try:
            return Client(endpoint, self.timeout_s, key=key)
        except ValueError as exc:  # an endpoint or timeout the client cannot use: the command line's fault
            raise CliError(_one_line(str(exc)), EXIT_USAGE) from exc

    def call(self, action: Callable[[Any], Any], **codes: int) -> Any:
        """Run ``action(client)``; client failures become :class:`CliError` (``codes``: see translate)."""
        from eplbctl.client import ClientError

        try:
            with self.client() as client:
                return action(client)
        except ClientError as exc:
            raise translate(exc, **codes) from exc

    def request(self, name: str, content: dict[str, Any] | None = None, **codes: int) -> dict[str, Any]:
        return self.call(lambda client: client.request(name, content or {}), **codes)

    def hello(self, **codes: int) -> dict[str, Any]:
        """The daemon's identity (protocol version checked by the client) with its sizes shape-checked."""
        reply = self.call(lambda client: client.hello(), **codes)
        try:
            for key in ("layers", "ranks", "experts", "slots_per_device"):
                if not isinstance(field(reply, key), int):
                    raise UnexpectedReply(f"unexpected reply from the daemon: '{key}' is not an integer")
        except UnexpectedReply as exc:
            if "unknown" in codes:
                raise translate(exc, unknown=codes["unknown"]) from exc
            raise
        return reply


pass_ctx = click.make_pass_decorator(CliContext)


def finite_or_none(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Callback for float options: FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


def check_timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """``--timeout``: finite, > 0 and at most a day."""
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise click.BadParameter(f"{value} is not a number of seconds in (0, {MAX_TIMEOUT_S:.0f}] "
                                 "(at most a day)", ctx=ctx, param=param)
    return value


def complete_policy(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of ``--policy``: built-in names and installed plug-ins' entry-point names.

    Entry points are listed, never loaded, so completing imports neither the policies nor numba.
    """
    from click.shell_completion import CompletionItem

    names = set(BUILTIN_POLICIES)
    try:
        from importlib.metadata import entry_points

        names.update(ep.name for ep in entry_points(group=POLICY_ENTRY_POINTS))
    except Exception:  # broken metadata must not break completion
        pass
    return [CompletionItem(name) for name in sorted(names) if name.startswith(incomplete)]


def check_params(policy: str, params: dict[str, str]) -> None:
    """Validate ``--param`` against the local registry: a bad value is a usage error (2) before any
    request. A policy this installation does not know is left to the daemon (it may have plug-ins)."""
    if not params:
        return
    from eplbctl.policies import REGISTRY, PolicyError, get_policy

    if policy not in REGISTRY:
        return
    try:
        get_policy(policy, params)
    except PolicyError as exc:
        usage_error(_one_line(str(exc)))


def json_option(func: F) -> F:
    """``--json``: print only JSON on stdout (machines), nothing else there."""
    return click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")(func)


def parse_params(values: tuple[str, ...]) -> dict[str, str]:
    """``--param k=v`` (repeatable) -> dict; strings are passed through, the policy validates types."""
    params: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="'--param'")
        params[key.strip()] = value.strip()
    return params


def param_option(func: F) -> F:
    return click.option(
        "--param", "params", multiple=True, metavar="KEY=VALUE", help="Policy parameter (repeatable)."
    )(func)


def usage_error(message: str) -> NoReturn:
    """A bad command line discovered after parsing (e.g. a layer spec checked against the daemon's L)."""
    raise CliError(message, EXIT_USAGE)


def check_layer_syntax(spec: str) -> None:
    """Reject a malformed layer spec (usage error) before anything asks the daemon for L."""
    from eplbctl.layerspec import LayerSpecError, check_syntax

    try:
        check_syntax(spec)
    except LayerSpecError as exc:
        usage_error(_one_line(str(exc)))


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    from eplbctl.layerspec import LayerSpecError, parse_layers

    try:
        return parse_layers(spec, num_layers)
    except (LayerSpecError, ValueError) as exc:
        usage_error(_one_line(str(exc)))


def handle_errors(func: F) -> F:
    """Turn stray client/value errors raised inside a command into one-line errors with exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            raise CliError("interrupted", EXIT_INTERRUPTED) from exc
        except UnexpectedReply as exc:
            raise translate(exc) from exc
        except Exception as exc:
            if _is_client_error(exc) or isinstance(exc, ValueError):
                raise translate(exc) from exc
            raise

    return wrapper  # type: ignore[return-value]
