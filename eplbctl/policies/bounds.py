"""Lower bounds on the imbalance a placement can reach, shown next to the benchmark's results."""

from __future__ import annotations

import numpy as np


def no_redundancy_bound(heat: np.ndarray, num_devices: int, slots: int) -> np.ndarray:
    """Lower bound on the imbalance of any placement without redundancy (E = N x S): heat [L, E] -> [L].

    Every device holds exactly S distinct experts. For each k <= N, either the k hottest experts sit on
    k distinct devices -- those devices then also hold k (S - 1) other experts, at least the lightest
    ones, and the hottest of them carries at least the average -- or two of them share a device, which
    then carries at least the (k-1)-th and k-th hottest plus the S - 2 lightest others. The peak is at
    least the smaller of the two, for every k, and at least the mean. (max(1, hottest / mean) ignores
    the S - 1 experts that share the hottest expert's device, and is far from reachable at S = 4.)
    """
    heat = np.asarray(heat, dtype=np.float64)
    num_layers, num_experts = heat.shape
    if num_devices * slots != num_experts:
        raise ValueError(f"no redundancy needs N x S = E (got {num_devices} x {slots} != {num_experts})")
    desc = -np.sort(-heat, axis=1)  # [L, E]
    mean = heat.sum(axis=1) / num_devices
    peak = mean.copy()
    for k in range(1, num_devices + 1):
        rest = np.sort(desc[:, k:], axis=1)  # [L, E - k] ascending
        spread = (desc[:, :k].sum(axis=1) + rest[:, :k * (slots - 1)].sum(axis=1)) / k
        shared = np.inf  # two of the k hottest on one device (impossible at S = 1)
        if k >= 2 and slots >= 2:
            shared = desc[:, k - 2] + desc[:, k - 1] + rest[:, :slots - 2].sum(axis=1)
        peak = np.maximum(peak, np.minimum(spread, shared))
    return np.divide(peak, mean, out=np.ones(num_layers), where=mean > 0)
