"""The device-side heat recorder: exact per-slot counts, in place, drained once per tick."""

from __future__ import annotations

import torch
from eplbd.recorder import SlotRecorder


def test_recorded_counts_equal_tokens_per_slot_and_drain_restarts_from_zero():
    rec = SlotRecorder(num_layers=3, slots=5, max_rows=8, device=torch.device("cpu"))
    ptr = rec.counts.data_ptr()
    a = torch.tensor([0, 4, 4, 1, 0, 0])
    b = torch.tensor([2] * 20)            # more rows than max_rows: still counted exactly
    rec.record(1, a)
    rec.record(2, b)
    rec.record(1, a[:0])                  # a layer step with no tokens here
    out = rec.drain()
    assert out.tolist() == [[0] * 5, [3, 1, 0, 0, 2], [0, 0, 20, 0, 0]]
    assert rec.counts.sum() == 0 and rec.counts.data_ptr() == ptr   # zeroed in place, never reallocated
    rec.record(0, torch.tensor([3]))
    assert rec.drain()[0].tolist() == [0, 0, 0, 1, 0]
