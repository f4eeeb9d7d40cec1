"""The placement policy, run in a child process with a timeout.

A policy that raises, crashes or hangs must never leave the workers waiting for a plan: the parent
waits at most `timeout_s`, kills a child that overran, and answers "no change" with the error.
The next request starts a fresh child. A policy refusing the instance or its params (its own
PolicyError) is told apart: that is the request's problem, not a failure of the daemon.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from eplbctl.policies.base import PolicyError

log = logging.getLogger("eplbd.planner")


class PlannerError(RuntimeError):
    """The policy failed, crashed or timed out; the placement stays as it is."""


class PolicyRefused(PlannerError):
    """The policy refused the instance or its params (its own PolicyError): the request's problem."""


@dataclass(frozen=True)
class PlanJob:
    policy: str
    params: dict[str, str]
    heat: np.ndarray            # [L, E] or [T, L, E]
    current: np.ndarray         # [L, N, S]
    topology: dict[str, Any]    # Topology fields
    layers: list[int] | None
    min_gain: float
    bytes_per_expert: int
    fault: str | None = None    # fault injection: "raise" | "hang" | "crash"


def run_plan(job: PlanJob) -> tuple[np.ndarray, dict]:
    """Compute a plan in this process -> (placement [L, N, S], PlanReport dict)."""
    from eplbctl.planning import make_plan
    from eplbctl.policies import get_policy
    from eplbctl.policies.base import Topology

    if job.fault == "raise":
        raise RuntimeError("injected policy failure")
    if job.fault == "hang":
        time.sleep(3600)
    if job.fault == "crash":
        os._exit(3)
    try:
        policy = _Refusals(get_policy(job.policy, job.params))
    except PolicyError as exc:
        raise PolicyRefused(str(exc)) from exc
    try:
        plan = make_plan(job.heat, job.current, Topology(**job.topology), policy, layers=job.layers,
                         min_gain=job.min_gain, bytes_per_expert=job.bytes_per_expert)
    except PolicyError as exc:
        # make_plan also raises PolicyError for a policy's crash (wrapped) and for an invalid result:
        # those are bugs, so only the error the policy's own `place` raised is a refusal.
        if exc is policy.refusal:
            raise PolicyRefused(str(exc)) from exc
        raise
    return plan.placement, plan.to_report()


class _Refusals:
    """A policy whose `place` remembers the PolicyError it raised itself, if any."""

    def __init__(self, policy: Any) -> None:
        self._policy = policy
        self.refusal: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def place(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._policy.place(*args, **kwargs)
        except PolicyError as exc:
            self.refusal = exc
            raise


def _warm() -> None:
    """Import and run the default policy once so its compiled code is loaded before any request."""
    from eplbctl.placement import contiguous_placement

    heat = np.arange(1.0, 9.0)[None, :]
    run_plan(PlanJob("default", {}, heat, contiguous_placement(1, 8, 2, 5),
                     {"num_devices": 2, "slots_per_device": 5}, None, 0.0, 0))


def _child_main(conn: Any) -> None:
    try:
        _warm()
    except Exception as exc:  # still serve: the request will report the real error
        log.warning("planner warm-up failed: %s", exc)
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", run_plan(job)))
        except PolicyRefused as exc:
            conn.send(("refused", str(exc)))
        except Exception as exc:  # the parent turns this into "no change" plus an error event
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Planner:
    """Parent side: one request at a time, each bounded by `timeout_s`."""

    def __init__(self, timeout_s: float = 30.0, startup_timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None

    def start(self) -> None:
        with self._lock:
            self._ensure_child()

    def restart_in_background(self) -> None:
        """Bring a fresh child up after a kill, so the next request does not wait for its start."""
        threading.Thread(target=self._restart_quietly, name="eplbd-planner-restart", daemon=True).start()

    def _restart_quietly(self) -> None:
        try:
            self.start()
        except PlannerError as exc:
            log.warning("%s", exc)

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._discard()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, args=(child,), name="eplbd-planner", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        # A policy's time limit must not include the child's start (imports, compiled-code loading).
        if not parent.poll(self.startup_timeout_s):
            self._discard()
            raise PlannerError(f"the planner process did not start within {self.startup_timeout_s:g}s")
        try:
            parent.recv()
        except (EOFError, OSError):
            self._discard()
            raise PlannerError("the planner process died while starting") from None

    def _discard(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def plan(self, job: PlanJob, blocking: bool = True) -> tuple[np.ndarray | None, dict | None]:
        """-> (placement, report); (None, None) when not blocking and another plan is running."""
        if not self._lock.acquire(blocking=blocking):
            return None, None
        lost = False
        try:
            self._ensure_child()
            try:
                self._conn.send(job)
                if not self._conn.poll(self.timeout_s):
                    lost = True
                    raise PlannerError(f"policy {job.policy} did not answer within {self.timeout_s:g}s; "
                                       "it was stopped and the placement is unchanged")
                status, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                lost = True
                raise PlannerError(f"policy {job.policy} process died ({type(exc).__name__}); "
                                   "the placement is unchanged") from None
        finally:
            if lost:
                self._discard()
            self._lock.release()
            if lost:
                self.restart_in_background()
        if status == "refused":
            raise PolicyRefused(value)
        if status != "ok":
            raise PlannerError(f"policy {job.policy} failed: {value}")
        return value

    def close(self) -> None:
        with self._lock:
            self._discard()
