"""Heat recorder: per-layer, per-local-slot token counters kept on the device.

Counting happens where tokens are processed (after dispatch), with `index_add_` into a
preallocated tensor: no host synchronisation, no allocation per step, and it stays valid inside a
captured graph. Warm-up and probe passes are not recorded (the caller passes probe=True).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Recorder(Protocol):
    def record(self, layer: int, slots: torch.Tensor) -> None: ...


class SlotRecorder:
    """counts [L, S] int64: tokens routed to each local slot since the last `drain`."""

    def __init__(self, num_layers: int, slots: int, max_rows: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_layers, slots, dtype=torch.int64, device=device)
        self._rows = self.counts.unbind(0)   # per-layer views made once: indexing costs as much as the add
        self._ones = torch.ones(max_rows, dtype=torch.int64, device=device)

    def record(self, layer: int, slots: torch.Tensor) -> None:
        n = slots.shape[0]
        if n > self._ones.shape[0]:  # more rows than the configured bound: grow once, stay correct
            self._ones = torch.ones(n, dtype=torch.int64, device=self._ones.device)
        self._rows[layer].index_add_(0, slots, self._ones[:n])

    def drain(self) -> torch.Tensor:
        """Return the counts since the last drain and restart from zero (one copy, at a tick)."""
        out = self.counts.clone()
        self.counts.zero_()
        return out


class NullRecorder:
    """Recording switched off: the forward path pays one no-op call per layer."""

    def record(self, layer: int, slots: torch.Tensor) -> None:
        return None
