"""`eplbd`: the daemon launcher. `eplbd sim` runs the simulated deployment in the foreground."""

from __future__ import annotations

import os
import signal
import sys


def _quiet_interrupt(signum: int, frame: object) -> None:
    os.write(2, b"eplbd: interrupted\n")
    os._exit(130)


def _is_the_program() -> bool:
    # Spawned ranks and planners re-import the program's main module: they handle Ctrl-C themselves.
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        return False
    return __name__ == "__main__" or os.path.basename(sys.argv[0]) == "eplbd"


# Ctrl-C while the interpreter is still importing (a second on a busy host) would print an import
# traceback; until the launcher takes Ctrl-C over there is nothing to clean up, so exit quietly.
# Only in the program itself, and never over an ignored SIGINT (a background job keeps ignoring it).
if _is_the_program() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _quiet_interrupt)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import math  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import NoReturn  # noqa: E402

import click  # noqa: E402
from eplbd.faults import FaultSpecError, check_faults  # noqa: E402
from eplbd.server import ServerError, take_over_socket  # noqa: E402
from eplbd.sim import SimConfig  # noqa: E402

from eplbctl.endpoint import ensure_endpoint_dir, resolve_endpoint  # noqa: E402
from eplbctl.signing import read_key  # noqa: E402

EX_USAGE, EX_DATAERR, EX_CANTCREAT, EX_TEMPFAIL = 2, 65, 73, 75


def die_with_caller() -> None:
    """EPLBD_PARENT_PID=PID (set by callers that own the daemon: `eplbctl demo`, the tests): get
    SIGTERM when that parent dies, even by kill -9, so a killed caller leaves no daemon behind.
    Operators starting eplbd from a shell leave it unset, and the daemon outlives the shell."""
    want = os.environ.get("EPLBD_PARENT_PID", "")
    if not want.isdigit():
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(want):      # the parent died before the line above: nobody will signal
        fail("the process that started eplbd (EPLBD_PARENT_PID) has exited", EX_TEMPFAIL)


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr and exit: every up-front check fails like this, before any rank starts."""
    click.echo(f"eplbd: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """EPLB daemon: records expert heat in every worker and serves the eplbctl control socket."""


@main.command()
@click.option("--ranks", default=4, show_default=True, type=click.IntRange(1, 64), help="Worker processes (EP ranks).")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False),
              help="Heat file driving the router (default: bundled DeepSeek-V3 prefill_in1024).")
@click.option("--layers", default="16", show_default=True,
              help="Use the first L MoE layers of the trace, or 'all' (DeepSeek-V3: 58).")
@click.option("--redundant", default=32, show_default=True, type=click.IntRange(0), help="Redundant slots R.")
@click.option("--hidden", default=64, show_default=True, type=click.IntRange(1), help="Hidden size H.")
@click.option("--ffn", default=128, show_default=True, type=click.IntRange(1), help="Expert FFN size F.")
@click.option("--top-k", default=8, show_default=True, type=click.IntRange(1), help="Experts per token.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens per rank per step.")
@click.option("--tick", default=10, show_default=True, type=click.IntRange(1), help="Steps per control tick.")
@click.option("--window", default=20, show_default=True, type=click.IntRange(1), help="Ticks in the heat window.")
@click.option("--layers-per-step", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Layers redeployed per forward step.")
@click.option("--endpoint", envvar="EPLBCTL_ENDPOINT", help="Control endpoint (default: per-user ipc socket).")
@click.option("--key-file", help="HMAC key file (required for tcp://).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", type=click.IntRange(1), help="Stop after this many steps (default: run until shutdown).")
@click.option("--policy", default="default", show_default=True, help="Placement policy.")
@click.option("--threshold", default=1.1, show_default=True, type=float, help="Imbalance threshold for --auto.")
@click.option("--min-gain", default=0.01, show_default=True, type=float,
              help="Move a layer only when its predicted imbalance improves by more than this.")
@click.option("--comm-timeout", default=30.0, show_default=True, type=float,
              help="Seconds any collective or transfer may wait before the deployment gives up.")
@click.option("--plan-timeout", default=30.0, show_default=True, type=float, help="Seconds a policy may run.")
@click.option("--max-ops", default=64, show_default=True, type=click.IntRange(1),
              help="Expert moves per batch_isend_irecv.")
@click.option("--staging-slots", type=click.IntRange(1), help="Staging buffer in experts (default: one layer's).")
@click.option("--step-sleep", default=0.0, show_default=True, type=float, help="Pause between steps, seconds.")
@click.option("--fault", "faults", multiple=True, help="Inject a fault (see eplbd.faults), repeatable.")
def sim(**opts: object) -> None:
    """Run the simulated deployment: N gloo ranks, real weights, real MoE forward, real transfers."""
    from eplbd.launcher import launch

    die_with_caller()
    layers = str(opts.pop("layers"))
    if layers != "all" and not layers.isdigit():
        raise click.BadParameter("must be a positive integer or 'all'", param_hint="--layers")
    opts["faults"] = list(opts["faults"])
    cfg = SimConfig(layers=None if layers == "all" else int(layers), **opts)  # type: ignore[arg-type]
    if cfg.key_file is not None:
        try:
            read_key(cfg.key_file)
        except ValueError as exc:
            fail(f"--key-file: {exc}", EX_USAGE)
    try:
        num_layers = check_config(cfg)
    except ValueError as exc:
        fail(str(exc), EX_DATAERR)
    try:
        check_faults(cfg.faults, cfg.ranks, num_layers)
    except FaultSpecError as exc:
        fail(str(exc), EX_USAGE)
    with contextlib.ExitStack() as held:
        try:   # before any rank starts: a second daemon on the socket is one line, not tracebacks
            held.enter_context(claim_endpoint(cfg.endpoint))
        except ServerError as exc:
            fail(str(exc), EX_TEMPFAIL)
        except OSError as exc:
            fail(f"cannot claim the control endpoint: {exc}", EX_CANTCREAT)
        code = launch(cfg)
    sys.exit(code)


@contextlib.contextmanager
def claim_endpoint(endpoint: str | None) -> Iterator[None]:
    """Hold an ipc endpoint for the daemon's life: ServerError when a daemon serves it or is still
    starting on it (its socket is not bound yet then, so only a lock beside it can tell).

    A stale socket left by a dead daemon is removed. tcp endpoints have no file to lock: a port that
    is taken fails rank 0's bind, which the launcher reports on one line."""
    resolved = resolve_endpoint(endpoint)
    path = ensure_endpoint_dir(resolved)
    if path is None:
        yield
        return
    lock_path = path + ".lock"
    fd = _lock(lock_path, resolved)
    try:
        take_over_socket(path, resolved)
        yield
    finally:
        # Under the lock the socket can only be ours: a rank killed before its orderly stop leaves it.
        with contextlib.suppress(OSError):
            os.unlink(path)
        # Unlinked while still held, so a waiter that opened it sees a dead inode and retries (_lock).
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _lock(lock_path: str, endpoint: str) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServerError(f"an eplbd daemon is already serving at {endpoint} or starting on it "
                              "(stop it or use another --endpoint)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)   # the previous holder removed this file as we opened it: lock the new one


def check_config(cfg: SimConfig) -> int:
    """Every mistake that would otherwise surface as a crash inside the ranks, said up front.
    -> the number of MoE layers the deployment will have."""
    from eplbd.sim import load_trace

    from eplbctl.placement import slots_per_device

    heat, _, _ = load_trace(cfg)
    experts = heat.shape[-1]
    slots_per_device(experts, cfg.ranks, cfg.redundant)
    if cfg.top_k > experts:
        raise ValueError(f"--top-k {cfg.top_k} exceeds the trace's {experts} experts")
    for name in ("comm_timeout", "plan_timeout", "threshold"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite positive number, got {value}")
    if cfg.threshold < 1.0:
        raise ValueError(f"--threshold is an imbalance (max/mean >= 1.0), got {cfg.threshold}")
    if not math.isfinite(cfg.min_gain) or cfg.min_gain < 0:
        raise ValueError(f"--min-gain must be a finite number >= 0, got {cfg.min_gain}")
    if not math.isfinite(cfg.step_sleep) or cfg.step_sleep < 0:
        raise ValueError(f"--step-sleep must be >= 0, got {cfg.step_sleep}")
    endpoint = resolve_endpoint(cfg.endpoint)
    if endpoint.startswith("tcp://") and not cfg.key_file:
        raise ValueError(f"{endpoint}: a tcp:// control endpoint needs --key-file (an HMAC key)")
    return int(heat.shape[-2])


if __name__ == "__main__":
    main()
