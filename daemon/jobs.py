"""The coordinator's ledger of redeployment jobs: their JobReports (docs/protocol.md), their profiles
and finished ProfileRecords, and which one is active. Plain bookkeeping, no locking of its own:
`Control` calls it under its lock, from the control server's threads and the agent's ticks.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Any

import numpy as np
from eplbd.profiler import JobProfile

from eplbctl.metrics import measured_imbalance

SETTLE_TICKS = 2        # ticks after a job before its measured result is reported


def known(value: float) -> float | None:
    """A measured figure for JSON: None (shown as "-") for a layer that recorded no token."""
    return None if np.isnan(value) else float(value)


class JobBook:
    def __init__(self, keep: int) -> None:
        self.jobs: dict[int, dict] = {}
        self.profiles: dict[int, JobProfile] = {}
        self.records: collections.deque[dict] = collections.deque(maxlen=keep)
        self.active: int | None = None           # the job planned, queued or moving (one at a time)
        self._ids = itertools.count(1)

    def open(self, layers: list[int], report: dict, measured: np.ndarray, gather_s: float) -> dict:
        """A job for the layers of `report` that change (active) or, when none does, a 'nochange' one."""
        changed = [row["layer"] for row in report["layers"] if row["change"]]
        job_id = next(self._ids)
        job = {"job_id": job_id, "state": "queued" if changed else "nochange", "layers": changed,
               "requested_layers": layers, "done_layers": [], "error": None, "plan": report,
               "measured_before": {str(la): known(measured[la]) for la in layers},
               "measured_after": None, "started_step": None, "finished_step": None}
        self.jobs[job_id] = job
        if changed:
            self.profiles[job_id] = JobProfile(job_id, changed, gather_s=gather_s, policy_s=float(report["seconds"]))
            self.active = job_id
        return job

    def started(self, job_id: int, step: int) -> None:
        self.jobs[job_id].update(state="transferring", started_step=step)
        self.profiles[job_id].started_at = time.perf_counter()

    def account(self, job_id: int | None, outcomes: list[Any], step: int) -> str | None:
        """Every layer that was in flight this step; ends the job when it is over. -> the error of a
        job that failed here (for the event log), else None."""
        job = self.jobs.get(job_id) if job_id is not None else None
        if job is None or job["state"] != "transferring" or not outcomes:
            return None
        failed = []
        for out in outcomes:
            self.profiles[job_id].per_layer.append(out.figures)
            if out.ok:
                job["done_layers"].append(out.layer)   # also when a sibling in flight failed: it moved
            else:
                why = "; ".join(out.errors) or "a rank reported a failure"
                failed.append(f"layer {out.layer} aborted on every rank ({why})")
        if failed:
            error = "; ".join(failed) + "; layers not yet started keep their placement"
            self.finish(job, "failed", step, error)
            return error
        if len(job["done_layers"]) == len(job["layers"]):
            self.finish(job, "done", step, None)
        return None

    def finish(self, job: dict, state: str, step: int, error: str | None) -> None:
        job.update(state=state, finished_step=step, error=error)
        self.records.append(self.profiles[job["job_id"]].record(time.perf_counter()))
        self.active = None

    def settle(self, ticks_per_layer: np.ndarray, slot_window: np.ndarray) -> None:
        """Jobs ended long enough ago for their moved layers' windows to hold only the new placement
        get their measured result (a failed job: for the layers it did move)."""
        measured = None        # computed at most once, and only when a job settles: this runs every tick
        for job in self.jobs.values():
            moved = job["done_layers"]
            if job["state"] not in ("done", "failed") or not moved or job["measured_after"] is not None:
                continue
            if np.all(ticks_per_layer[moved] >= SETTLE_TICKS):
                measured = measured_imbalance(slot_window) if measured is None else measured
                job["measured_after"] = {str(la): known(measured[la]) for la in moved}

    def active_job(self) -> dict | None:
        return self.jobs[self.active] if self.active is not None else None
