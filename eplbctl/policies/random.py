"""``random``: a valid random placement (every expert present, no expert twice on a device), seeded.

Per layer: every expert gets one replica and the R redundant slots go to uniformly drawn experts with
fewer than N replicas; replicas are then laid out expert after expert down the columns of an [S, N]
grid (consecutive positions are on distinct devices, so c <= N replicas never share one), and devices
and slots are shuffled. The generator is seeded by (seed, layer): the same seed gives the same plan.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from eplbctl.metrics import predicted_imbalance
from eplbctl.policies.base import Param, Policy, PolicyResult, Topology, check_inputs, window_heat


def random_layer(num_experts: int, num_devices: int, slots: int, rng: np.random.Generator) -> np.ndarray:
    """-> assign [N, S] valid placement drawn from rng."""
    counts = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_devices * slots - num_experts):
        open_ = np.flatnonzero(counts < num_devices)
        counts[rng.choice(open_)] += 1
    order = rng.permutation(num_experts)
    experts = np.repeat(order, counts[order])  # [P], each expert's replicas consecutive
    grid = experts.reshape(slots, num_devices).T  # position p -> device p % N, slot p // N
    grid = grid[rng.permutation(num_devices)]
    return np.take_along_axis(grid, rng.permuted(np.tile(np.arange(slots), (num_devices, 1)), axis=1), axis=1)


class RandomPolicy(Policy):
    """A valid random placement, for tests and as a floor in benchmarks."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "valid random placement (seeded), for tests"
    params: ClassVar[dict[str, Param]] = {
        "seed": Param("seed", int, 0, "random seed (the same seed gives the same placement)",
                      lambda v: None if v >= 0 else "must be >= 0"),
    }

    def place(self, heat: np.ndarray, current: np.ndarray, topo: Topology) -> PolicyResult:
        heat, current = check_inputs(heat, current, topo)
        window = window_heat(heat)  # [L, E]
        num_layers, num_experts = window.shape
        out = np.stack([
            random_layer(num_experts, topo.num_devices, topo.slots_per_device,
                         np.random.default_rng([self.values["seed"], layer]))
            for layer in range(num_layers)
        ]).astype(np.int64)
        change = predicted_imbalance(out, window) < predicted_imbalance(current, window)
        return PolicyResult(placement=out, change=change, mode="random")
