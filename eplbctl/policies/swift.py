"""``swift``: incremental placement -- start from the current placement and move few experts.

Per layer, with the correct load model (an expert's heat / its replica count), repeat on the peak device:
  - swap: exchange a replica of the peak device with a lighter one of another device (0-2 moves);
  - re-allot: a slot holding a replica of an expert with several replicas anywhere becomes one more
    replica of an expert of the peak device (0-1 move; every replica of both experts changes load);
take the operation with the best peak reduction per move (a move = a slot whose new expert its device
did not hold in the current placement; undoing an earlier move is free), within the move budget, until
nothing lowers the peak device. Ties go to the lowest device, slot and expert index.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numba import njit

from eplbctl.metrics import predicted_imbalance
from eplbctl.policies.base import Param, Policy, PolicyResult, Topology, check_inputs, window_heat
from eplbctl.policies.search import _TOL, holds_of, loads_of


@njit(cache=True)
def _best_swap(assign, load, holds, orig, w, m, left):
    """-> (score, j, a, b, cost) of the best swap between peak device m and another device."""
    num_devices, num_slots = assign.shape
    top = load[m]
    best = (0.0, -1, -1, -1, 0)
    for j in range(num_devices):
        if j == m or load[j] >= top:
            continue
        for a in range(num_slots):
            ea = assign[m, a]
            if holds[j, ea]:
                continue
            for b in range(num_slots):
                eb = assign[j, b]
                delta = w[ea] - w[eb]
                if delta <= 0.0 or holds[m, eb]:
                    continue
                peak = max(top - delta, load[j] + delta)
                gain = top - peak
                if gain <= _TOL * top:
                    continue
                cost = (0 if orig[j, ea] else 1) + (0 if orig[m, eb] else 1)
                if cost > left:
                    continue
                score = gain / max(cost, 0.5)
                if score > best[0]:
                    best = (score, j, a, b, cost)
    return best


@njit(cache=True)
def _best_reallot(h, c, assign, load, holds, orig, m, left):
    """-> (score, x, s, r, cost): slot (x, s) of a multi-replica expert becomes a replica of expert r of
    the peak device m; the score uses the new global peak."""
    num_devices, num_slots = assign.shape
    top = load[m]
    best = (0.0, -1, -1, -1, 0)
    for a in range(num_slots):
        r = assign[m, a]
        if c[r] >= num_devices:
            continue
        wr_new = h[r] / (c[r] + 1)
        for x in range(num_devices):
            if holds[x, r]:
                continue
            cost = 0 if orig[x, r] else 1
            if cost > left:
                continue
            for s in range(num_slots):
                dn = assign[x, s]
                if c[dn] <= 1:
                    continue
                wd_new = h[dn] / (c[dn] - 1)
                peak = 0.0
                for d in range(num_devices):
                    ld = load[d]
                    if holds[d, r]:
                        ld += wr_new - h[r] / c[r]
                    if d == x:
                        ld += wr_new - h[dn] / c[dn]
                    elif holds[d, dn]:
                        ld += wd_new - h[dn] / c[dn]
                    if ld > peak:
                        peak = ld
                gain = top - peak
                if gain <= _TOL * top:
                    continue
                score = gain / max(cost, 0.5)
                if score > best[0]:
                    best = (score, x, s, r, cost)
    return best


@njit(cache=True)
def swift_layer(h, current, max_moves, max_iter):
    """h [E], current [N, S] -> (new [N, S], moves used) within max_moves moves."""
    num_experts = h.shape[0]
    assign = current.copy()
    c = np.bincount(assign.ravel(), minlength=num_experts).astype(np.int64)
    w = h / c
    load = loads_of(assign, w)
    holds = holds_of(assign, num_experts)
    orig = holds.copy()
    used = 0
    for _ in range(max_iter):
        m = np.argmax(load)
        left = max_moves - used
        sw = _best_swap(assign, load, holds, orig, w, m, left)
        ra = _best_reallot(h, c, assign, load, holds, orig, m, left)
        if sw[1] < 0 and ra[1] < 0:
            break
        if ra[1] >= 0 and (sw[1] < 0 or ra[0] > sw[0]):
            _, x, s, r, cost = ra
            dn = assign[x, s]
            assign[x, s] = r
            holds[x, dn] = False
            holds[x, r] = True
            c[r] += 1
            c[dn] -= 1
            w = h / c
            load = loads_of(assign, w)
        else:
            _, j, a, b, cost = sw
            ea, eb = assign[m, a], assign[j, b]
            assign[m, a], assign[j, b] = eb, ea
            holds[m, ea], holds[m, eb] = False, True
            holds[j, eb], holds[j, ea] = False, True
            load[m] += w[eb] - w[ea]
            load[j] += w[ea] - w[eb]
        used += cost
    return assign, used


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


class SwiftPolicy(Policy):
    """Incremental: few moves from the current placement (swaps and re-allotted redundant slots)."""

    name: ClassVar[str] = "swift"
    summary: ClassVar[str] = "incremental: bounded swaps and re-allotted redundant slots from the current placement"
    params: ClassVar[dict[str, Param]] = {
        "max_moves": Param("max_moves", float, 0.05,
                           "move budget per layer: a share of the slots if < 1, else a count", _positive),
        "max_iter": Param("max_iter", int, 10000, "operations tried per layer at most",
                          lambda v: None if v >= 1 else "must be >= 1"),
    }

    def place(self, heat: np.ndarray, current: np.ndarray, topo: Topology) -> PolicyResult:
        heat, current = check_inputs(heat, current, topo)
        window = window_heat(heat)  # [L, E]
        budget = self.values["max_moves"]
        slots = topo.num_physical
        moves = int(budget * slots) if budget < 1 else int(budget)
        out = np.empty_like(current)
        for layer in range(len(window)):
            out[layer], _ = swift_layer(np.ascontiguousarray(window[layer]), np.ascontiguousarray(current[layer]),
                                        moves, self.values["max_iter"])
        change = predicted_imbalance(out, window) < predicted_imbalance(current, window) * (1 - 1e-12)
        out[~change] = current[~change]
        return PolicyResult(placement=out, change=change, mode="incremental")
