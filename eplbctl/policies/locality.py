"""Node/group locality for ``flashlb``: strict (every replica on its group's node) or relaxed (replicas
of hot experts may live on other nodes while the share of tokens that cross nodes stays in a budget).

Conventions (DeepSeek's): expert e belongs to group e // (E / G); device d belongs to node d // (N / K).
Strict: groups go to nodes by an exact min-max partition (G / K groups per node), then each node is an
independent pool solved by ``joint.solve_layer``. Relaxed: start from strict, then swaps and
re-allotments across nodes are allowed while the load served off its home node stays <= budget x heat.
The crossing share of a placement = heat served by replicas off their expert's home node / total heat.
For reports: ``crossing_share`` (the same count, blind to how nodes are numbered) and ``strict_bound``
(what no strict placement can beat).
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment

from eplbctl.policies.exchange import improve_deep_local
from eplbctl.policies.joint import solve_layer
from eplbctl.policies.search import _TOL, holds_of, improve, loads_of, pack


def group_nodes(group_heat: np.ndarray, nodes: int) -> np.ndarray:
    """group_heat [G] -> node of each group [G], G / K groups per node, minimizing the hottest node.

    Exact for G <= 12 (enumeration of partitions, first best in lexicographic order), else LPT.
    """
    groups = len(group_heat)
    per = groups // nodes
    if groups > 12:
        node_of = np.empty(groups, dtype=np.int64)
        load = np.zeros(nodes)
        fill = np.zeros(nodes, dtype=np.int64)
        for g in np.lexsort((np.arange(groups), -group_heat)):
            free = np.flatnonzero(fill < per)
            n = int(free[np.argmin(load[free])])
            node_of[g], load[n], fill[n] = n, load[n] + group_heat[g], fill[n] + 1
        return node_of
    best: tuple[float, list[int]] = (np.inf, [])

    def rec(left: list[int], node: int, node_of: list[int], peak: float) -> None:
        nonlocal best
        if peak >= best[0] * (1 - _TOL):
            return
        if not left:
            best = (peak, list(node_of))
            return
        first, rest = left[0], left[1:]
        for combo in itertools.combinations(rest, per - 1):
            members = (first, *combo)
            for g in members:
                node_of[g] = node
            rec([g for g in rest if g not in combo], node + 1, node_of,
                max(peak, float(group_heat[list(members)].sum())))

    rec(list(range(groups)), 0, [0] * groups, 0.0)
    return np.array(best[1], dtype=np.int64)


def place_strict(h: np.ndarray, num_devices: int, slots: int, nodes: int, groups: int,
                 args: tuple) -> np.ndarray:
    """h [E] -> assign [N, S]; every replica on its group's node. args: solve_layer's search arguments."""
    num_experts = len(h)
    size = num_experts // groups
    node_of_group = group_nodes(h.reshape(groups, size).sum(axis=1), nodes)
    per_node = num_devices // nodes
    assign = np.empty((num_devices, slots), dtype=np.int64)
    for node in range(nodes):
        ids = np.concatenate([np.arange(g * size, (g + 1) * size) for g in np.flatnonzero(node_of_group == node)])
        sub = solve_layer(np.ascontiguousarray(h[ids]), per_node, slots, *args)  # [N/K, S] local ids
        assign[node * per_node:(node + 1) * per_node] = ids[sub]
    return assign


@njit(cache=True)
def crossing_load(assign, w, home, node_of):
    """Load served by replicas away from their expert's home node."""
    num_devices, num_slots = assign.shape
    total = 0.0
    for d in range(num_devices):
        for s in range(num_slots):
            e = assign[d, s]
            if node_of[d] != home[e]:
                total += w[e]
    return total


@njit(cache=True)
def balance_nodes(h, cnt, home, per_node, budget):
    """Node level of the relaxed mode (in place on cnt [K, E], replicas of each expert per node).

    Repeatedly: on the coldest node that can help, one redundant replica of a cheap donor becomes a
    replica of the expert with the heaviest replica on the hottest node; kept only while the hottest
    node gets lighter and the crossing load (heat served off its home node) stays <= budget.
    -> crossing load.
    """
    nodes, num_experts = cnt.shape
    c = cnt.sum(axis=0)
    node_load = np.zeros(nodes)
    for k in range(nodes):
        for e in range(num_experts):
            node_load[k] += cnt[k, e] * h[e] / c[e]
    cross = 0.0
    for e in range(num_experts):
        for k in range(nodes):
            if k != home[e]:
                cross += cnt[k, e] * h[e] / c[e]
    for _ in range(num_experts * nodes):
        hot = np.argmax(node_load)
        peak = node_load[hot]
        best_peak = peak * (1.0 - _TOL)
        best = (-1, -1, -1)
        best_cross = cross
        for r in range(num_experts):
            if cnt[hot, r] == 0 or c[r] >= per_node * nodes:
                continue
            for j in range(nodes):
                if j == hot or cnt[j, r] >= per_node:
                    continue
                for dn in range(num_experts):
                    if dn == r or cnt[j, dn] == 0 or c[dn] <= 1:
                        continue
                    # loads after: r gets c+1 replicas (one more on j), dn one fewer (off j)
                    wr_old, wr_new = h[r] / c[r], h[r] / (c[r] + 1)
                    wd_old, wd_new = h[dn] / c[dn], h[dn] / (c[dn] - 1)
                    worst = 0.0
                    new_cross = cross
                    for k in range(nodes):
                        nr = cnt[k, r] + (1 if k == j else 0)
                        nd = cnt[k, dn] - (1 if k == j else 0)
                        lk = node_load[k] - cnt[k, r] * wr_old + nr * wr_new - cnt[k, dn] * wd_old + nd * wd_new
                        worst = max(worst, lk)
                        if k != home[r]:
                            new_cross += nr * wr_new - cnt[k, r] * wr_old
                        if k != home[dn]:
                            new_cross += nd * wd_new - cnt[k, dn] * wd_old
                    if worst < best_peak and new_cross <= budget:
                        best_peak = worst
                        best = (r, j, dn)
                        best_cross = new_cross
        r, j, dn = best
        if r < 0:
            break
        cnt[j, r] += 1
        cnt[j, dn] -= 1
        c[r] += 1
        c[dn] -= 1
        cross = best_cross
        for k in range(nodes):
            node_load[k] = 0.0
            for e in range(num_experts):
                node_load[k] += cnt[k, e] * h[e] / c[e]
    return cross


def place_relaxed(h: np.ndarray, num_devices: int, slots: int, nodes: int, groups: int, share: float,
                  args: tuple) -> tuple[np.ndarray, float]:
    """h [E] -> (assign [N, S], crossing share); at most `share` of the heat served off its home node."""
    num_experts = len(h)
    size = num_experts // groups
    per_node = num_devices // nodes
    strict = place_strict(h, num_devices, slots, nodes, groups, args)
    total = float(h.sum())
    if total <= 0 or share <= 0:
        return strict, 0.0
    home = np.repeat(group_nodes(h.reshape(groups, size).sum(axis=1), nodes), size).astype(np.int64)  # [E]
    node_of = np.arange(num_devices, dtype=np.int64) // per_node  # [N]
    cnt = np.zeros((nodes, num_experts), dtype=np.int64)  # replicas of each expert per node
    np.add.at(cnt, (np.repeat(node_of, slots), strict.ravel()), 1)
    balance_nodes(h, cnt, home, per_node, share * total)
    c = cnt.sum(axis=0)
    w = h / c  # [E] per-replica load, now fixed
    assign = np.empty((num_devices, slots), dtype=np.int64)
    max_iter, tol = args[2], args[5]  # args: solve_layer's (rounds, width, max_iter, tree_slots, node_limit, tol)
    for k in range(nodes):
        ids = np.flatnonzero(cnt[k])
        sub, load, holds = pack(np.ascontiguousarray(w[ids] * cnt[k, ids]), cnt[k, ids], per_node, slots)
        improve(sub, load, holds, w[ids], max_iter)
        assign[k * per_node:(k + 1) * per_node] = ids[sub]
    cross = crossing_load(assign, w, home, node_of)
    holds = holds_of(assign, num_experts)
    load = loads_of(assign, w)
    _, cross = improve_deep_local(assign, load, holds, w, max_iter, tol, home, node_of, share * total, cross)
    strict_c = np.bincount(strict.ravel(), minlength=num_experts)
    if load.max() >= loads_of(strict, h / strict_c).max():  # crossing did not pay: keep strict
        return strict, 0.0
    return assign, float(cross / total)


def layer_budgets(heat: np.ndarray, nodes: int, groups: int, share: float) -> np.ndarray:
    """Split a crossing budget (share of all tokens of all layers) over layers -> per-layer share [L].

    The node-level export a layer needs to bring every node down to tau x the mean node load is
    sum_k (W_k - tau H / K)+; tau is the lowest level whose total export fits the budget, so the budget
    goes where the node imbalance is worst. Leftover budget is spread in proportion to heat.
    """
    num_layers = heat.shape[0]
    gheat = heat.reshape(num_layers, groups, -1).sum(axis=2)  # [L, G]
    node_heat = np.zeros((num_layers, nodes))
    for layer in range(num_layers):
        np.add.at(node_heat[layer], group_nodes(gheat[layer], nodes), gheat[layer])
    totals = heat.sum(axis=1)  # [L]
    budget = share * totals.sum()

    def export(tau: float) -> np.ndarray:  # [L] tokens
        return np.clip(node_heat - tau * totals[:, None] / nodes, 0, None).sum(axis=1)

    lo, hi = 1.0, float(nodes)
    if export(lo).sum() > budget:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if export(mid).sum() > budget else (lo, mid)
        lo = hi
    need = export(lo)
    spare = max(budget - need.sum(), 0.0)
    extra = spare * totals / max(totals.sum(), 1e-300)
    return np.divide(need + extra, totals, out=np.zeros(num_layers), where=totals > 0)


def crossing_share(placement: np.ndarray, heat: np.ndarray, nodes: int, groups: int) -> np.ndarray:
    """Share of each layer's tokens that cross nodes: placement [L, N, S], heat [L, E] -> [L].

    A group's home node is its node in the assignment of groups to nodes (G / K each) that keeps the most
    tokens at home (exact, as an assignment problem over G group x G node-place pairs), so relabelling
    nodes changes nothing and a strict placement scores 0; the load model splits an expert's tokens
    evenly over its replicas. Never above the policy's own count (its home nodes are one such assignment).
    A zero-heat layer has share 0."""
    num_layers, num_devices, slots = placement.shape
    num_experts = heat.shape[1]
    node_of = np.repeat(np.arange(num_devices) // (num_devices // nodes), slots)  # [N * S]
    out = np.zeros(num_layers)
    for layer in range(num_layers):
        h = np.asarray(heat[layer], dtype=np.float64)
        total = h.sum()
        if total <= 0:
            continue
        flat = placement[layer].ravel()
        w = (h / np.maximum(np.bincount(flat, minlength=num_experts), 1))[flat]  # [N * S] per slot
        served = np.zeros((groups, nodes))  # tokens of group g served on node k
        np.add.at(served, (flat // (num_experts // groups), node_of), w)
        gain = np.repeat(served, groups // nodes, axis=1)  # [G, G]: a node once per group it takes
        rows, cols = linear_sum_assignment(gain, maximize=True)
        out[layer] = max(0.0, 1.0 - gain[rows, cols].sum() / total)
    return out


def strict_bound(heat: np.ndarray, num_devices: int, nodes: int, groups: int) -> np.ndarray:
    """Lower bound on the imbalance of any strict placement (every replica on its group's node): heat [L, E]
    -> [L]. Some node carries at least the hottest node of the best group-to-node partition, and an expert
    has at most N / K replicas on its node; either load spread over the node's N / K devices is a floor.
    The partition is exact only for G <= 12 (``group_nodes``); beyond, the mean node load stands in."""
    per_node = num_devices // nodes
    out = np.ones(heat.shape[0])
    for layer, h in enumerate(np.asarray(heat, dtype=np.float64)):
        total = h.sum()
        if total <= 0:
            continue
        gheat = h.reshape(groups, -1).sum(axis=1)
        node_peak = total / nodes
        if groups <= 12:
            node_peak = np.bincount(group_nodes(gheat, nodes), weights=gheat, minlength=nodes).max()
        out[layer] = max(node_peak, h.max()) / per_node / (total / num_devices)
    return out
