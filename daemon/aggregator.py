"""Control-tick aggregation: per-slot counts of every rank gathered on the small group, and the
coordinator's heat history.

The gather returns one row per rank; the layout is made explicit ([N, L, S] -> [L, N, S]) right at
the boundary, so layers and ranks can never be interleaved by a reshape. Counts are per token
processed: each token is counted once per top-k choice on the rank that computed it, never
multiplied by a data-parallel size.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplbctl.metrics import logical_heat_from_slots


def gather_rows(payload: torch.Tensor, world: int, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather a 1-D int64 payload -> [N, len] (row n = rank n)."""
    rows = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(rows, payload, group=group)
    return torch.stack(rows)


@dataclass
class Tick:
    step: int                 # last step included
    steps: int                # steps covered
    slot_counts: np.ndarray   # [L, N, S] tokens per physical slot during this tick
    heat: np.ndarray          # [L, E] the same tokens per logical expert


class HeatHistory:
    """The last `window` ticks of heat, kept on the coordinator only."""

    def __init__(self, num_layers: int, num_experts: int, window: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.ticks: collections.deque[Tick] = collections.deque(maxlen=max(1, window))
        self.steps_recorded = 0
        self.tokens_total = 0

    def add(self, step: int, steps: int, slot_counts: np.ndarray, placement: np.ndarray) -> Tick:
        """slot_counts [L, N, S] recorded under `placement` [L, N, S] (the one in force then)."""
        heat = logical_heat_from_slots(slot_counts, placement, self.num_experts)
        tick = Tick(step, steps, slot_counts, heat)
        self.ticks.append(tick)
        self.steps_recorded += steps
        self.tokens_total += int(slot_counts.sum())
        return tick

    def window(self, since: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sums over the window, per layer only over ticks after `since[l]` (its last change step).

        -> slot counts [L, N, S], logical heat [L, E], ticks counted per layer [L].
        """
        if not self.ticks:
            raise ValueError("no tick recorded yet")
        steps = np.array([t.step for t in self.ticks])                       # [W]
        keep = steps[:, None] > np.asarray(since)[None, :]                     # [W, L]
        slots = np.stack([t.slot_counts for t in self.ticks])                  # [W, L, N, S]
        heat = np.stack([t.heat for t in self.ticks])                          # [W, L, E]
        slot_sum = (slots * keep[:, :, None, None]).sum(axis=0)
        heat_sum = (heat * keep[:, :, None]).sum(axis=0)
        return slot_sum, heat_sum, keep.sum(axis=0)

    def full_window_heat(self) -> np.ndarray:
        """Logical heat over every tick of the window regardless of changes: [L, E]."""
        if not self.ticks:
            raise ValueError("no tick recorded yet")
        return np.sum([t.heat for t in self.ticks], axis=0)
