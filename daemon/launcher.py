"""The launcher of the simulated deployment: starts the ranks, says a failed start on one line, names
the rank that died or hung to rank 0, and stops every rank on Ctrl-C, SIGTERM or shutdown.

The ranks themselves (``worker``) live in ``sim.py``; what the launcher and they share is ``Links``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import time
from typing import Any

from eplbd.faults import exit_text, is_cause
from eplbd.sim import FAILED, HUNG_GRACE_S, RUNNING, Links, SimConfig, StartFailure, worker

log = logging.getLogger("eplbd.launcher")


def _drain(q: Any) -> list[Any]:
    items = []
    with contextlib.suppress(queue.Empty):
        while True:
            items.append(q.get_nowait())
    return items


class _Watch:
    """The launcher's eye on the ranks: a failed start said once on one line, ranks that ended or
    hung named to rank 0 as soon as that is clear."""

    def __init__(self, cfg: SimConfig, procs: list[Any], links: Links) -> None:
        self.cfg, self.procs, self.links = cfg, procs, links
        self.reported: set[int] = set()
        self.notices: list[str] = []
        self.first_failure: float | None = None   # when a rank first failed or gave up
        self.lone_since: float | None = None      # since when one rank alone has neither failed nor given up
        self.rank0_hung = False

    def start_up(self, signals: list[int]) -> int | None:
        """None once rank 0 serves (or a bounded run ended early); else the launcher's exit code."""
        while not self.links.ready.is_set():
            if signals:   # nothing to save yet: the caller kills the ranks
                print("eplbd: interrupted while starting", file=sys.stderr, flush=True)
                return 128 + signals[0]
            if any(p.exitcode not in (None, 0) for p in self.procs):
                return self._start_failure()
            if self.procs[0].exitcode == 0:
                return None
            time.sleep(0.05)
        return None

    def _start_failure(self) -> int:
        # The rank that failed first reports before it exits; the others then fail on the lost peer.
        failures: list[StartFailure] = []
        deadline = time.monotonic() + 2.0
        while not any(f.cause for f in failures) and time.monotonic() < deadline \
                and any(p.exitcode is None for p in self.procs) and all((p.exitcode or 0) >= 0 for p in self.procs):
            time.sleep(0.05)
            failures += _drain(self.links.reports)
        failures += _drain(self.links.reports)
        told = {f.rank for f in failures}
        died = [StartFailure(r, f"{exit_text(r, p.exitcode)} while starting", 1, True)
                for r, p in enumerate(self.procs) if p.exitcode not in (None, 0) and r not in told]
        first = ([f for f in failures if f.cause] + died + failures)[0]
        print(f"eplbd: error: {first.text}", file=sys.stderr, flush=True)
        return first.code

    def run(self) -> int | None:
        """Until rank 0 ends (or ignores a stop): None, or the exit code when rank 0 itself hung."""
        deadline = None
        while self.procs[0].is_alive():
            self._note_exits()
            self._note_hung()
            if self.links.stop.is_set() and deadline is None:
                deadline = time.monotonic() + 15
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return 1 if self.rank0_hung else None

    def _note_exits(self) -> None:
        for rank, p in enumerate(self.procs[1:], start=1):
            code = p.exitcode             # polling also reaps it: no zombies
            if code not in (None, 0) and rank not in self.reported and not self.links.stop.is_set():
                self._tell(rank, exit_text(rank, code))
        if self.links.coord.value != RUNNING and self.first_failure is None:
            self.first_failure = time.monotonic()

    def _tell(self, rank: int, text: str) -> None:
        self.reported.add(rank)
        self.first_failure = self.first_failure or time.monotonic()
        self.notices.append(text)
        log.error("%s", text)
        self.links.deaths.put(text)

    def _note_hung(self) -> None:
        """A rank that stopped answering is named once every other rank has given up on a peer (exited
        with code 1, or rank 0 said so) and it alone has not: one merely waiting on ranks that left
        would have failed within HUNG_GRACE_S. Otherwise (several hung, or a cause already known and
        some rank still waiting) ranks still alive well after their peers' time limit are hung."""
        if self.first_failure is None or self.links.stop.is_set():
            return
        now = time.monotonic()
        coord = self.links.coord.value
        waiting = [r for r, p in enumerate(self.procs)
                   if p.is_alive() and r not in self.reported and not (r == 0 and coord != RUNNING)]
        lone = len(waiting) == 1 and coord != FAILED and not any(is_cause(n) for n in self.notices)
        self.lone_since = (self.lone_since or now) if lone else None
        if (lone and now - self.lone_since > HUNG_GRACE_S) or now > self.first_failure + self.cfg.comm_timeout + 5:
            for rank in waiting:
                self.procs[rank].kill()
                text = f"rank {rank} stopped answering (hung); the launcher killed it"
                if rank == 0:   # nobody is left to serve status: say it here and end
                    self.reported.add(0)
                    self.rank0_hung = True
                    print(f"eplbd: error: {text}", file=sys.stderr, flush=True)
                else:
                    self._tell(rank, text)


def _reap(procs: list[Any], grace_s: float) -> None:
    grace = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, grace - time.monotonic()))
    late = [p for p in procs if p.is_alive()]
    for p in late:   # all at once: killed one by one, the survivors would log the lost peer
        p.kill()
    for p in late:
        p.join()


def launch(cfg: SimConfig) -> int:
    """Run the deployment in the foreground until shutdown; return the daemon's exit code."""
    signals: list[int] = []
    links: Links | None = None

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)
        if links is not None:
            links.stop.set()

    # Before the shared objects exist: exiting while they are made would leave the semaphores behind.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = mp.get_context("spawn")
    links = Links(ctx.Event(), ctx.Event(), ctx.Value("i", RUNNING, lock=False), ctx.Queue(), ctx.Queue())
    if signals:
        links.stop.set()
    with tempfile.TemporaryDirectory(prefix="eplbd-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=worker, args=(r, cfg, store_path, links), name=f"eplbd-rank{r}")
                 for r in range(cfg.ranks)]
        # A child keeps the signal mask across exec: with SIGINT blocked, a Ctrl-C while a rank is still
        # importing cannot kill it with a traceback (it ignores SIGINT first thing, then unblocks it).
        # A Ctrl-C meanwhile stays pending here and is handled once the ranks are started.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        watch = _Watch(cfg, procs, links)
        code = None
        try:
            code = watch.start_up(signals)   # a failed or interrupted start has nothing to save
            code = code if code is not None else watch.run()
        finally:
            _reap(procs, grace_s=0.0 if code is not None else 10.0)
        if code is None:
            code = procs[0].exitcode
            code = 1 if code is None else (code if code >= 0 else 128 - code)
        return code
