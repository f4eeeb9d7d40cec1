"""Joint replica allotment and placement for one pool of devices: the engine of ``flashlb``.

Same glossary as ``search.py``. For one layer:
  1. allot + pack + improve (``search.py``), then 2-for-2 exchanges where swaps stall (``exchange.py``);
  2. small pools (P <= tree_slots): every count vector whose lower bound beats the incumbent is packed,
     first greedily, then by a depth-first branch and bound with pruning on the best peak and a
     look-ahead (a device must still take its S - fill - 1 lightest replicas), under a node budget;
  3. large pools: re-allotment rounds -- one replica moves from a cheap donor to an expert of the peak
     device, the swaps re-run, and the change stays only when the peak drops.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplbctl.policies.exchange import differencing_pack, improve_deep
from eplbctl.policies.search import _TOL, allot, holds_of, improve, loads_of, pack


@njit(cache=True)
def tree_pack(h, c, num_devices, num_slots, bound, node_limit):
    """Branch and bound over the packing for counts c: -> (found, assign [N, S], peak).

    Replicas go in LPT order; a device is tried only if its load plus the replica plus the lightest
    S - fill - 1 remaining replicas stays under the best peak (look-ahead); among empty devices only
    the first is tried, and replicas of one expert take increasing devices (symmetry).
    """
    num_experts = h.shape[0]
    w = h / c
    order = np.argsort(-w, kind="mergesort")
    total = int(c.sum())
    item = np.empty(total, dtype=np.int64)
    k = 0
    for e in order:
        for _ in range(c[e]):
            item[k] = e
            k += 1
    tail = np.zeros(num_slots + 1)  # tail[q] = sum of the q lightest replicas
    for q in range(1, num_slots + 1):
        tail[q] = tail[q - 1] + w[item[total - q]]
    load = np.zeros(num_devices)
    fill = np.zeros(num_devices, dtype=np.int64)
    holds = np.zeros((num_devices, num_experts), dtype=np.bool_)
    dev = np.full(total, -1, dtype=np.int64)
    best_assign = np.full((num_devices, num_slots), -1, dtype=np.int64)
    best = bound
    found = False
    nodes = 0
    i = 0
    while i >= 0 and nodes < node_limit:
        e = item[i]
        if dev[i] >= 0:  # undo the previous choice for item i
            d = dev[i]
            load[d] -= w[e]
            fill[d] -= 1
            holds[d, e] = False
        seen_empty = dev[i] >= 0 and fill[dev[i]] == 0  # empty devices are interchangeable
        start = dev[i] + 1
        if i > 0 and item[i - 1] == e and dev[i - 1] + 1 > start:
            start = dev[i - 1] + 1
        limit = best - _TOL * max(best, 1.0)
        nxt = -1
        for d in range(start, num_devices):
            if fill[d] >= num_slots or holds[d, e]:
                continue
            if fill[d] == 0:
                if seen_empty:
                    continue
                seen_empty = True
            rest = num_slots - fill[d] - 1
            if rest > total - i - 1:
                rest = total - i - 1
            if load[d] + w[e] + tail[rest] < limit:
                nxt = d
                break
        if nxt < 0:
            dev[i] = -1
            i -= 1
            continue
        dev[i] = nxt
        load[nxt] += w[e]
        fill[nxt] += 1
        holds[nxt, e] = True
        nodes += 1
        if i == total - 1:
            best = load.max()
            found = True
            pos = np.zeros(num_devices, dtype=np.int64)
            for q in range(total):
                d = dev[q]
                best_assign[d, pos[d]] = item[q]
                pos[d] += 1
        else:
            i += 1
            dev[i] = -1
    return found, best_assign, best, nodes


@njit(cache=True)
def _pack_improve(h, c, num_devices, num_slots, max_iter, tree_slots, node_limit, tol):
    """-> (assign, load, holds, tree nodes used) for counts c: LPT + swaps and 2-for-2 exchanges
    (``exchange.py``); without redundancy also from a differencing start; then the tree search on small
    pools."""
    assign, load, holds = pack(h, c, num_devices, num_slots)
    w = h / c
    improve_deep(assign, load, holds, w, max_iter, tol)
    if num_devices * num_slots == h.shape[0] and load.max() > h.sum() / num_devices * (1.0 + tol):
        alt = differencing_pack(h, num_devices, num_slots)  # no redundancy: a second start, keep the better
        aload = loads_of(alt, w)
        aholds = holds_of(alt, h.shape[0])
        improve_deep(alt, aload, aholds, w, max_iter, tol)
        if aload.max() < load.max() * (1.0 - _TOL):
            assign, load, holds = alt, aload, aholds
    nodes = 0
    if num_devices * num_slots <= tree_slots and node_limit > 0:
        found, tree, _, nodes = tree_pack(h, c, num_devices, num_slots, load.max(), node_limit)
        if found:
            assign = tree
            load = loads_of(assign, w)
            holds[:, :] = False
            for d in range(num_devices):
                for s in range(num_slots):
                    holds[d, assign[d, s]] = True
    return assign, load, holds, nodes


@njit(cache=True)
def peak_bound(h, c, num_devices, num_slots):
    """A lower bound on the peak for counts c: max(mean, heaviest replica + the S - 1 lightest others)."""
    w = h / c
    top = np.argmax(w)
    order = np.argsort(w, kind="mergesort")
    extra = 0.0
    need = num_slots - 1
    for e in order:
        if need == 0:
            break
        if e == top:
            continue
        take = min(need, c[e])
        extra += take * w[e]
        need -= take
    return max(h.sum() / num_devices, w[top] + extra)


@njit(cache=True)
def enumerate_allotments(h, num_devices, num_slots, assign, limit, max_iter, node_limit, tol):
    """Exhaustive allotment search for small pools: every count vector whose bound beats the best peak
    is packed (LPT + swaps, then branch and bound).  assign [N, S] is the incumbent -> the best found."""
    num_experts = h.shape[0]
    total = num_devices * num_slots
    best = loads_of(assign, h / np.bincount(assign.ravel(), minlength=num_experts)).max()
    best_assign = assign.copy()
    order = np.argsort(-h, kind="mergesort")
    cur = np.zeros(num_experts, dtype=np.int64)
    low = np.zeros(num_experts, dtype=np.int64)
    c = np.ones(num_experts, dtype=np.int64)
    rem = total
    i = 0
    cur[0] = min(num_devices, rem - (num_experts - 1))
    low[0] = max(1, rem - (num_experts - 1) * num_devices)
    evaluated = 0
    spent = 0  # tree nodes over all evaluations: at most 20 x node_limit per layer
    while i >= 0 and evaluated < limit and spent < 20 * node_limit:
        if cur[i] < low[i]:
            i -= 1
            if i >= 0:
                rem += cur[i]
                cur[i] -= 1
            continue
        e = order[i]
        if h[e] / cur[i] >= best * (1.0 - _TOL):  # fewer replicas only raise h / c
            cur[i] = low[i] - 1
            continue
        rem -= cur[i]
        if i < num_experts - 1:
            i += 1
            cur[i] = min(num_devices, rem - (num_experts - i - 1))
            low[i] = max(1, rem - (num_experts - i - 1) * num_devices)
            continue
        for k in range(num_experts):
            c[order[k]] = cur[k]
        if peak_bound(h, c, num_devices, num_slots) < best * (1.0 - _TOL):
            evaluated += 1
            cand, cload, _, used = _pack_improve(h, c, num_devices, num_slots, max_iter, total, node_limit, tol)
            spent += used
            if cload.max() < best * (1.0 - _TOL):
                best = cload.max()
                best_assign = cand
        rem += cur[i]
        cur[i] -= 1
    return best_assign


@njit(cache=True)
def _reallot(h, c, assign, load, holds, m, max_iter, width):
    """Give one more replica to an expert of the peak device m, taken from a cheap donor, in place of
    the donor's replica on the lightest device that lacks the receiver; re-improve.  -> True if the
    peak dropped (the state is then updated in place), False (state unchanged) otherwise."""
    num_devices, num_slots = assign.shape
    num_experts = h.shape[0]
    peak = load.max()
    cost = np.full(num_experts, np.inf)
    for e in range(num_experts):
        if c[e] > 1:
            cost[e] = h[e] / (c[e] - 1)
    donors = np.argsort(cost, kind="mergesort")[:width]
    for a in range(num_slots):
        r = assign[m, a]
        if c[r] >= num_devices:
            continue
        for dn in donors:
            if dn == r or c[dn] <= 1:
                continue
            x, xs = -1, -1
            for d in range(num_devices):
                if holds[d, dn] and not holds[d, r] and (x < 0 or load[d] < load[x]):
                    x = d
            if x < 0:
                continue
            for s in range(num_slots):
                if assign[x, s] == dn:
                    xs = s
            trial = assign.copy()
            trial[x, xs] = r
            c[r] += 1
            c[dn] -= 1
            w = h / c
            tload = loads_of(trial, w)
            tholds = holds_of(trial, num_experts)
            improve(trial, tload, tholds, w, max(1, max_iter // 8))
            if tload.max() < peak * (1.0 - _TOL):
                assign[:, :] = trial
                load[:] = tload
                holds[:, :] = tholds
                return True
            c[r] -= 1
            c[dn] += 1
    return False


@njit(cache=True)
def solve_layer(h, num_devices, num_slots, rounds, width, max_iter, tree_slots, node_limit, tol):
    """One layer: h [E] -> assign [N, S] minimizing the peak device load (joint allotment + placement)."""
    c = allot(h, num_devices * num_slots, num_devices)
    assign, load, holds, _ = _pack_improve(h, c, num_devices, num_slots, max_iter, tree_slots, node_limit, tol)
    if num_devices * num_slots <= tree_slots and node_limit > 0:
        return enumerate_allotments(h, num_devices, num_slots, assign, rounds * 1000, max_iter, node_limit, tol)
    floor = h.sum() / num_devices
    for _ in range(rounds):
        if load.max() <= floor * (1.0 + tol):
            break
        if not _reallot(h, c, assign, load, holds, np.argmax(load), max_iter, width):
            break
        improve_deep(assign, load, holds, h / c, max_iter, tol)
    return assign


@njit(cache=True)
def solve_layers(heat, num_devices, num_slots, rounds, width, max_iter, tree_slots, node_limit, tol):
    """heat [L, E] -> phy2log [L, N, S] (each layer independently)."""
    num_layers = heat.shape[0]
    out = np.empty((num_layers, num_devices, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        out[layer] = solve_layer(heat[layer], num_devices, num_slots, rounds, width, max_iter, tree_slots,
                                 node_limit, tol)
    return out
