"""``eplbctl demo``: start a simulated deployment, rebalance its worst layers, check the model output.

Also the two daemon-lifecycle commands the demo is built from: ``eplbctl verify`` (the daemon's output
check: exit 1 when the output differs from the start-up baseline) and ``eplbctl shutdown``.

The daemon (``eplbd sim``) runs in its own process group on a private ipc endpoint inside a temporary
directory, so the demo never talks to (or collides with) a daemon the operator already runs. Whatever
happens (a failed check, Ctrl-C, SIGTERM), the ``finally`` kills that process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from eplbctl.cli.base import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    CliContext,
    CliError,
    field,
    handle_errors,
    json_option,
    pass_ctx,
)
from eplbctl.cli.output import Terminal

START_TIMEOUT_S = 120.0
HEAT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
WORST_LAYERS = 4
READY_LINE = "serving on"


class DemoFailed(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(f"demo failed: {message}", EXIT_FAILURE)


def sim_command(args: list[str], endpoint: str) -> list[str]:
    """The daemon's command line (a seam for tests, which run a protocol-shaped stand-in instead)."""
    return [sys.executable, "-m", "eplbd.main", "sim", *args, "--endpoint", endpoint]


class SimProcess:
    """``eplbd sim`` in its own session/process group, its output in a log file."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.log_path = workdir / "eplbd.log"
        self.endpoint = f"ipc://{workdir / 'control.sock'}"
        cmd = sim_command(args, self.endpoint)
        with open(self.log_path, "wb") as log:
            # start_new_session: the workers the launcher spawns share its group, so one killpg ends all;
            # EPLBD_PARENT_PID: and a demo killed by a signal it cannot catch takes the daemon with it.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**os.environ, "EPLBD_PARENT_PID": str(os.getpid())})

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.log_text():
            if self.proc.poll() is not None:
                raise DemoFailed(f"eplbd sim exited with code {self.proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise DemoFailed(f"eplbd sim did not start serving within {timeout_s:.0f} s")
            time.sleep(0.1)

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"eplbd sim did not exit within {timeout_s:.0f} s of shutdown") from None

    def kill(self) -> None:
        """SIGTERM the whole group, then SIGKILL what is left; never raises."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            try:  # the leader is gone; workers of its group may linger a moment
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=5.0)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} not seen within {timeout_s:.0f} s")
        time.sleep(0.25)


def has_heat(obj: CliContext, layers: list[int] | None = None) -> bool:
    """True once every (chosen) layer has recorded tokens in its window."""
    from eplbctl.cli.status import fetch_status

    reply = fetch_status(obj, layers)
    return bool(reply["layers"]) and all(int(row["window_tokens"]) > 0 for row in reply["layers"])


def show_status(term: Terminal, obj: CliContext, title: str) -> dict[str, Any]:
    from eplbctl.cli.status import fetch_status, render, select_rows

    term.line(f"\n== {title} ==")
    reply = fetch_status(obj, None)
    render(term, reply, select_rows(list(reply["layers"]), "layer", None), as_json=False)
    return reply


def run_demo(term: Terminal, obj: CliContext, sim: SimProcess) -> None:
    with term.spinner("starting eplbd sim (worker processes, gloo)..."):
        sim.wait_ready(START_TIMEOUT_S)
        wait_for(lambda: has_heat(obj), HEAT_TIMEOUT_S, "heat on every layer")
    before = show_status(term, obj, "status")

    from eplbctl.cli.rebalance import report_job, show_plan, wait_for_job
    from eplbctl.cli.status import worst_first

    worst = sorted(before["layers"], key=worst_first)[:WORST_LAYERS]
    layers = sorted(int(r["layer"]) for r in worst)
    term.line(f"\n== rebalance of the {len(layers)} worst layers: {','.join(map(str, layers))} ==")
    content = {"layers": layers, "auto": False, "threshold": None, "policy": None, "params": {}}
    plan = field(obj.request("rebalance", {**content, "dry_run": True}), "plan")
    show_plan(term, plan)
    job = field(obj.request("rebalance", {**content, "dry_run": False}), "job")
    job = wait_for_job(obj, term, job, quiet=False)
    if job["state"] == "failed":
        raise DemoFailed(f"job {job['job_id']} failed: {job.get('error')}")
    report_job(term, job, as_json=False, show_job_plan=False)
    if job["state"] == "done":
        # Measured imbalance restarts at a layer's change: wait for fresh tokens before showing it.
        wait_for(lambda: has_heat(obj, layers), HEAT_TIMEOUT_S, "heat after the redeployment")
    show_status(term, obj, "status after the redeployment")

    from eplbctl.cli.profile import memory_line, per_layer_table, phases_table

    term.line("\n== profile ==")
    records = field(obj.request("profile", {"last": 5}), "records")
    if records:
        term.table(phases_table(records))
        term.table(per_layer_table(records))
    term.line(memory_line(field(obj.request("profile", {"last": 1}), "memory")))

    term.line("\n== verify: model output before and after ==")
    verify = obj.request("verify", {})
    term.line(verify_line(verify))
    if not verify_ok(verify):
        raise DemoFailed("model output changed after the redeployment")
    term.line("model output is bit-identical to the baseline")

    obj.request("shutdown", {})
    code = sim.wait_exit(STOP_TIMEOUT_S)
    if code != 0:
        raise DemoFailed(f"eplbd sim exited with code {code} after shutdown")
    term.line("\ndemo passed: daemon shut down cleanly")


def verify_ok(reply: dict[str, Any]) -> bool:
    """The daemon says ok and the digests agree (a reply lacking them is an unexpected reply)."""
    return reply.get("ok") is True and field(reply, "baseline") == field(reply, "current")


def verify_line(reply: dict[str, Any]) -> str:
    weights = reply.get("weights_ok")
    checksums = "" if weights is None else f", slot checksums {'ok' if weights else 'MISMATCH'}"
    return (f"step {reply.get('step', '-')}: baseline {field(reply, 'baseline')}, "
            f"current {field(reply, 'current')}{checksums}")


@click.command()
@json_option
@pass_ctx
@handle_errors
def verify(obj: CliContext, as_json: bool) -> None:
    """Run the daemon's output check now: baseline vs current digest (exit 1 on mismatch)."""
    reply = obj.request("verify", {})
    ok = verify_ok(reply)
    term = Terminal()
    if as_json:
        term.json({k: v for k, v in reply.items() if k != "status"})
    else:
        term.line(verify_line(reply))
    if not ok:
        raise CliError("model output differs from the start-up baseline", EXIT_FAILURE)
    if not as_json:
        term.line("model output is bit-identical to the baseline")


@click.command()
@pass_ctx
@handle_errors
def shutdown(obj: CliContext) -> None:
    """Ask the daemon to stop (it replies, then the deployment shuts down)."""
    obj.request("shutdown", {})
    Terminal().note(f"eplbd at {obj.resolved_endpoint()} is shutting down")


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the finally below still kills the simulated deployment.
    raise KeyboardInterrupt


@click.command()
@click.option("--ranks", type=click.IntRange(min=1), default=4, show_default=True,
              help="EP ranks (processes).")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="MoE layers (default: the daemon's).")
@click.option("--keep-logs", is_flag=True,
              help="Keep the daemon's log and temp dir (kept anyway on failure).")
@pass_ctx
@handle_errors
def demo(obj: CliContext, ranks: int, layers: int | None, keep_logs: bool) -> None:
    """Run a local simulated deployment end to end: status, rebalance, profile, verify, shutdown."""
    term = Terminal()
    workdir = Path(tempfile.mkdtemp(prefix="eplbctl-demo-"))
    args = ["--ranks", str(ranks)] + (["--layers", str(layers)] if layers is not None else [])
    # The user's --timeout still bounds each request, but the sim is busy on a 2-core box: give it room.
    private = CliContext(endpoint=None, timeout_s=max(obj.timeout_s, 30.0), key_file=None)
    # signal.signal works only in the main thread (not, say, under a threaded test runner).
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if on_main else None
    passed = False
    sim: SimProcess | None = None
    try:
        sim = SimProcess(workdir, args)
        private.endpoint = sim.endpoint
        run_demo(term, private, sim)
        passed = True
    except KeyboardInterrupt:
        raise CliError("interrupted; the simulated deployment was stopped", EXIT_INTERRUPTED) from None
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        if sim is not None:
            sim.kill()
            if not passed:
                tail = sim.log_tail()
                if tail:
                    term.note(f"last lines of {sim.log_path}:\n{tail}")
        if keep_logs or not passed:
            term.note(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
