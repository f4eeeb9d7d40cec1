"""Deeper search for one pool of devices (numba, ``cache=True``): 2-for-2 exchanges and a differencing start.

Same glossary as ``search.py``. Every device keeps exactly S slots, so the only moves are k-for-k
exchanges. ``improve_local`` (1-for-1 swaps) stalls when no single swap lowers the peak device; then a
pair of its replicas is exchanged for a pair of a lighter device's replicas, the exchange that lowers the
peak the most (ties: lowest device, then lowest slots), and the 1-for-1 search resumes. Without
redundancy (E = N x S, cardinality-constrained number partitioning) ``differencing_pack`` gives a second
starting point to LPT.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplbctl.policies.search import _TOL, improve_local


@njit(cache=True)
def _cross_delta(e, src, dst, w, home, node_of):
    """Change of the crossing load when one replica of e moves from device src to device dst."""
    if node_of[src] == node_of[dst]:
        return 0.0
    return w[e] * ((node_of[dst] != home[e]) - (node_of[src] != home[e]))


@njit(cache=True)
def exchange_pair(assign, load, holds, w, home, node_of, budget, crossing):
    """One best 2-for-2 exchange between the peak device and any other (in place).
    -> (made, crossing after)."""
    num_devices, num_slots = assign.shape
    if num_slots < 2:
        return False, crossing
    m = np.argmax(load)
    top = load[m]
    best_peak = top - _TOL * max(top, 1.0)
    bj, ba1, ba2, bb1, bb2 = -1, -1, -1, -1, -1
    bcross = crossing
    npairs = num_slots * (num_slots - 1) // 2
    pa = np.empty(npairs)  # weight of each pair of slots on m
    k = 0
    for a1 in range(num_slots):
        for a2 in range(a1 + 1, num_slots):
            pa[k] = w[assign[m, a1]] + w[assign[m, a2]]
            k += 1
    for j in range(num_devices):
        if j == m:
            continue
        lj = load[j]
        if lj >= best_peak:
            continue
        k = 0
        for a1 in range(num_slots):
            for a2 in range(a1 + 1, num_slots):
                wa = pa[k]
                k += 1
                ea1, ea2 = assign[m, a1], assign[m, a2]
                if holds[j, ea1] or holds[j, ea2]:
                    continue
                for b1 in range(num_slots):
                    eb1 = assign[j, b1]
                    if holds[m, eb1]:
                        continue
                    for b2 in range(b1 + 1, num_slots):
                        eb2 = assign[j, b2]
                        delta = wa - w[eb1] - w[eb2]
                        if delta <= 0.0:
                            continue
                        peak = max(top - delta, lj + delta)
                        if peak >= best_peak or holds[m, eb2]:
                            continue
                        cross = crossing
                        if node_of[m] != node_of[j]:
                            cross += (_cross_delta(ea1, m, j, w, home, node_of)
                                      + _cross_delta(ea2, m, j, w, home, node_of)
                                      + _cross_delta(eb1, j, m, w, home, node_of)
                                      + _cross_delta(eb2, j, m, w, home, node_of))
                        if cross <= budget:
                            best_peak = peak
                            bj, ba1, ba2, bb1, bb2 = j, a1, a2, b1, b2
                            bcross = cross
    if bj < 0:
        return False, crossing
    for a, b in ((ba1, bb1), (ba2, bb2)):
        ea = assign[m, a]
        eb = assign[bj, b]
        assign[m, a] = eb
        assign[bj, b] = ea
        holds[m, ea] = False
        holds[bj, eb] = False
        load[m] += w[eb] - w[ea]
        load[bj] += w[ea] - w[eb]
    for a in (ba1, ba2):
        holds[m, assign[m, a]] = True
    for b in (bb1, bb2):
        holds[bj, assign[bj, b]] = True
    return True, bcross


@njit(cache=True)
def improve_deep_local(assign, load, holds, w, max_iter, tol, home, node_of, budget, crossing):
    """1-for-1 swaps until they stall, then one 2-for-2 exchange, repeated (in place), within the crossing
    budget; no exchange once the peak is within ``tol`` of the mean (an exchange scan costs N S^4 / 4).
    -> (moves made, crossing after)."""
    done = 0
    floor = load.sum() / load.shape[0] * (1.0 + tol)
    while done < max_iter:
        made, crossing = improve_local(assign, load, holds, w, max_iter - done, home, node_of, budget, crossing)
        done += made
        if done >= max_iter or load.max() <= floor:
            break
        ok, crossing = exchange_pair(assign, load, holds, w, home, node_of, budget, crossing)
        if not ok:
            break
        done += 1
    return done, crossing


@njit(cache=True)
def improve_deep(assign, load, holds, w, max_iter, tol):
    """``improve_deep_local`` without a locality budget.  -> moves made."""
    zero = np.zeros(w.shape[0], dtype=np.int64)
    return improve_deep_local(assign, load, holds, w, max_iter, tol, zero,
                              np.zeros(assign.shape[0], dtype=np.int64), np.inf, 0.0)[0]



@njit(cache=True)
def differencing_pack(h, num_devices, num_slots):
    """Balanced largest differencing (Karmarkar-Karp for equal cardinality), one replica per expert:
    h [E], E = N x S -> assign [N, S].

    The experts, hottest first, form S rows of N; each row is a partial placement (one expert per device).
    Repeatedly the two partial placements with the largest spread (max - min; ties: lower index) merge,
    the heaviest devices of one with the lightest of the other, until one is left.
    """
    order = np.argsort(-h, kind="mergesort")
    sums = np.empty((num_slots, num_devices))
    members = np.full((num_slots, num_devices, num_slots), -1, dtype=np.int64)
    size = np.ones(num_slots, dtype=np.int64)  # experts per device in each partial placement
    alive = np.ones(num_slots, dtype=np.bool_)
    for r in range(num_slots):
        for d in range(num_devices):
            e = order[r * num_devices + d]
            sums[r, d] = h[e]
            members[r, d, 0] = e
    for _ in range(num_slots - 1):
        a, b = -1, -1
        for r in range(num_slots):  # the two largest spreads
            if not alive[r]:
                continue
            spread = sums[r].max() - sums[r].min()
            if a < 0 or spread > sums[a].max() - sums[a].min():
                a, b = r, a
            elif b < 0 or spread > sums[b].max() - sums[b].min():
                b = r
        ia = np.argsort(-sums[a], kind="mergesort")
        ib = np.argsort(sums[b], kind="mergesort")
        merged = np.empty(num_devices)
        joined = np.full((num_devices, num_slots), -1, dtype=np.int64)
        for d in range(num_devices):
            merged[d] = sums[a, ia[d]] + sums[b, ib[d]]
            joined[d, :size[a]] = members[a, ia[d], :size[a]]
            joined[d, size[a]:size[a] + size[b]] = members[b, ib[d], :size[b]]
        sums[a] = merged
        members[a] = joined
        size[a] += size[b]
        alive[b] = False
    for r in range(num_slots):
        if alive[r]:
            return members[r].copy()
    return members[0].copy()
