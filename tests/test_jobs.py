"""The job ledger: what a job reports is what its layers did, whatever order their outcomes come in."""

from __future__ import annotations

import numpy as np
from eplbd.jobs import SETTLE_TICKS, JobBook
from eplbd.profiler import LayerOutcome


def _report(layers: list[int]) -> dict:
    return {"seconds": 0.01, "layers": [{"layer": la, "change": True} for la in layers]}


def _outcome(layer: int, ok: bool) -> LayerOutcome:
    figures = {"layer": layer, "bytes": 0, "plan_s": 0.0, "transfer_s": 0.0, "verify_s": 0.0, "commit_s": 0.0,
               "stall_s": 0.0}
    return LayerOutcome(layer, ok, [] if ok else ["rank 1: checksum mismatch"], figures)


def test_a_failed_layer_and_committed_siblings_in_one_step_end_the_job_failed_with_the_siblings_moved() -> None:
    book = JobBook(keep=5)
    job = book.open([0, 1, 2], _report([0, 1, 2]), np.array([1.3, 1.2, np.nan]), gather_s=0.0)
    assert job["measured_before"] == {"0": 1.3, "1": 1.2, "2": None} and book.active == job["job_id"]
    book.started(job["job_id"], step=10)
    error = book.account(job["job_id"], [_outcome(0, True), _outcome(1, False), _outcome(2, True)], step=11)
    assert job["state"] == "failed" and job["done_layers"] == [0, 2] and "layer 1 aborted" in error
    assert book.active is None and len(book.records) == 1 and len(book.records[0]["per_layer"]) == 3
    # a late account for the ended job changes nothing
    assert book.account(job["job_id"], [_outcome(1, True)], step=12) is None
    assert job["state"] == "failed" and job["done_layers"] == [0, 2] and len(book.records) == 1
    # the layers it did move get their measured result once their windows settled
    window = np.array([[[101.0], [99.0]], [[120.0], [80.0]], [[102.0], [98.0]]])   # [L, N, S]: 1.01, 1.2, 1.02
    book.settle(np.full(3, SETTLE_TICKS), window)
    assert job["measured_after"] == {"0": 1.01, "2": 1.02}


def test_a_job_is_done_only_when_every_layer_moved() -> None:
    book = JobBook(keep=5)
    job = book.open([4, 5], _report([4, 5]), np.ones(6), gather_s=0.0)
    book.started(job["job_id"], step=1)
    assert book.account(job["job_id"], [_outcome(4, True)], step=2) is None and job["state"] == "transferring"
    book.account(job["job_id"], [_outcome(5, True)], step=3)
    assert job["state"] == "done" and book.active is None
    book.settle(np.array([0, 0, 0, 0, SETTLE_TICKS, SETTLE_TICKS - 1]), np.ones((6, 2, 1)))
    assert job["measured_after"] is None                 # layer 5 has not settled yet
