"""The coordinator's account of a fault: the job it failed tells the best-known cause."""

from __future__ import annotations

import numpy as np
from eplbd.control import Control

from eplbctl.policies.base import Topology


def test_a_later_better_account_of_a_fault_replaces_the_failed_jobs_error() -> None:
    control = Control(Topology(2, 4), 6, window_ticks=4, tokens_per_step=32, layers_per_step=1, expert_bytes=1,
                      memory={}, planner=None)
    placement = np.zeros((1, 2, 4), dtype=np.int64)
    report = {"layers": [{"layer": 0, "change": True}], "seconds": 0.0}
    job_id = control._queue_job(None, [0], placement, report, np.ones(1))["job_id"]
    control.set_fault("rank 1 exited with code 1")                        # a rank that gave up, seen first
    job = control.job({"job_id": job_id})["job"]
    assert job["state"] == "failed" and job["error"] == "rank 1 exited with code 1"
    control.update_fault("rank 2 stopped answering (hung); the launcher killed it")   # the verdict, later
    job = control.job({"job_id": job_id})["job"]
    assert job["error"] == "rank 2 stopped answering (hung); the launcher killed it"
    assert control.fault == job["error"]
