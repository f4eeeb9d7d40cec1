"""Multi-episode objective: the expected per-episode peak instead of the peak of the window sum.

A window sum hides when experts are hot: two experts that peak in different episodes can share a
device at no cost, two that peak together cannot. Given a heat series ``ht [T, E]`` for one layer and
counts ``c [E]``, the objective is ``sum_t peak_t / mean_t`` (the mean per-episode imbalance times T;
an all-zero episode counts 0). ``improve_episodes`` runs best-improvement swaps between any two devices
on that objective, starting from the window-sum placement, so it never ends worse on the series.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplbctl.policies.search import _TOL, holds_of


@njit(cache=True)
def episode_loads(assign, ht, c):
    """assign [N, S], ht [T, E], c [E] -> load [T, N]."""
    num_devices, num_slots = assign.shape
    steps = ht.shape[0]
    load = np.zeros((steps, num_devices))
    for t in range(steps):
        for d in range(num_devices):
            for s in range(num_slots):
                e = assign[d, s]
                load[t, d] += ht[t, e] / c[e]
    return load


@njit(cache=True)
def episode_objective(load, scale):
    """load [T, N], scale [T] (1 / mean_t, 0 for empty episodes) -> sum_t peak_t * scale_t."""
    total = 0.0
    for t in range(load.shape[0]):
        total += load[t].max() * scale[t]
    return total


@njit(cache=True)
def _top3(load):
    """load [T, N] -> (values [T, 3], devices [T, 3]) of the three largest loads per episode."""
    steps, num_devices = load.shape
    val = np.full((steps, 3), -np.inf)
    idx = np.full((steps, 3), -1, dtype=np.int64)
    for t in range(steps):
        for d in range(num_devices):
            x = load[t, d]
            if x > val[t, 0]:
                val[t, 2], idx[t, 2] = val[t, 1], idx[t, 1]
                val[t, 1], idx[t, 1] = val[t, 0], idx[t, 0]
                val[t, 0], idx[t, 0] = x, d
            elif x > val[t, 1]:
                val[t, 2], idx[t, 2] = val[t, 1], idx[t, 1]
                val[t, 1], idx[t, 1] = x, d
            elif x > val[t, 2]:
                val[t, 2], idx[t, 2] = x, d
    return val, idx


@njit(cache=True)
def improve_episodes(assign, ht, c, max_iter):
    """Swap local search on the multi-episode objective (in place). assign [N, S], ht [T, E], c [E].
    -> objective after."""
    num_devices, num_slots = assign.shape
    steps, num_experts = ht.shape
    w = np.empty((steps, num_experts))
    for t in range(steps):
        for e in range(num_experts):
            w[t, e] = ht[t, e] / c[e]
    load = episode_loads(assign, ht, c)
    scale = np.zeros(steps)
    for t in range(steps):
        mean = load[t].sum() / num_devices
        if mean > 0:
            scale[t] = 1.0 / mean
    holds = holds_of(assign, num_experts)
    current = episode_objective(load, scale)
    for _ in range(max_iter):
        val, idx = _top3(load)
        best = current - _TOL * max(current, 1.0)
        bi, bj, ba, bb = -1, -1, -1, -1
        for i in range(num_devices):
            for j in range(i + 1, num_devices):
                for a in range(num_slots):
                    ea = assign[i, a]
                    if holds[j, ea]:
                        continue
                    for b in range(num_slots):
                        eb = assign[j, b]
                        if holds[i, eb]:
                            continue
                        total = 0.0
                        for t in range(steps):
                            if scale[t] == 0.0:
                                continue
                            delta = w[t, ea] - w[t, eb]
                            other = val[t, 0]  # the largest load on a device other than i and j
                            if idx[t, 0] == i or idx[t, 0] == j:
                                other = val[t, 1]
                                if idx[t, 1] == i or idx[t, 1] == j:
                                    other = val[t, 2]
                            peak = max(other, load[t, i] - delta, load[t, j] + delta)
                            total += peak * scale[t]
                            if total >= best:
                                break
                        if total < best:
                            best = total
                            bi, bj, ba, bb = i, j, a, b
        if bi < 0:
            break
        ea = assign[bi, ba]
        eb = assign[bj, bb]
        assign[bi, ba] = eb
        assign[bj, bb] = ea
        holds[bi, ea] = False
        holds[bi, eb] = True
        holds[bj, eb] = False
        holds[bj, ea] = True
        for t in range(steps):
            delta = w[t, ea] - w[t, eb]
            load[t, bi] -= delta
            load[t, bj] += delta
        current = episode_objective(load, scale)
    return current
