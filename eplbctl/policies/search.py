"""Primitives of the placement search for one pool of devices (numba, ``cache=True``).

Glossary: E experts, N devices, S slots per device, P = N * S slots. ``h [E]`` is one layer's heat,
``c [E]`` replica counts (1 <= c <= N, sum P), ``w = h / c`` the load of one replica (the load model),
``assign [N, S]`` the expert held by each slot, ``holds [N, E]`` whether a device holds an expert.

  allot   -- water-filling: each redundant slot goes to the expert with the largest heat per replica
             (ties: fewer replicas first, then lower id), so the heaviest replica is as light as it can be;
  pack    -- heaviest replica first onto the lightest device with room that lacks the expert;
  improve -- swap local search on the peak device: the swap that lowers it most, until none does
             (optionally keeping the load served away from an expert's home node within a budget).
Every choice has an explicit tie-break (lowest index), so the same input gives the same placement.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_TOL = 1e-9


@njit(cache=True)
def allot(h: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """Water-filling: h [E] -> c [E] int64, sum num_slots, 1 <= c <= cap (h/c desc, c asc, id asc)."""
    num_experts = h.shape[0]
    c = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_slots - num_experts):
        best = -1
        for e in range(num_experts):
            if c[e] >= cap:
                continue
            if best < 0:
                best = e
                continue
            a = h[e] * c[best]
            b = h[best] * c[e]  # compare h[e]/c[e] with h[best]/c[best] without dividing
            if a > b or (a == b and c[e] < c[best]):
                best = e
        c[best] += 1
    return c


@njit(cache=True)
def _repair(assign, fill, load, holds, w, e, num_slots):
    """Every device with room already holds e: move an item f from a full device d2 lacking e into the
    room of device d, and give f's slot on d2 to e. Always possible (d2 holds S distinct experts, d at
    most S - 1, so at least one of d2's items is not on d).  -> None, e placed."""
    num_devices = assign.shape[0]
    best_d = -1
    best_d2 = -1
    best_s = -1
    best_peak = np.inf
    for d in range(num_devices):
        if fill[d] >= num_slots:
            continue
        for d2 in range(num_devices):
            if fill[d2] < num_slots or holds[d2, e]:
                continue
            for s in range(num_slots):
                f = assign[d2, s]
                if holds[d, f]:
                    continue
                peak = max(load[d] + w[f], load[d2] - w[f] + w[e])
                if peak < best_peak:
                    best_peak = peak
                    best_d, best_d2, best_s = d, d2, s
    f = assign[best_d2, best_s]
    assign[best_d, fill[best_d]] = f
    fill[best_d] += 1
    holds[best_d, f] = True
    load[best_d] += w[f]
    holds[best_d2, f] = False
    assign[best_d2, best_s] = e
    holds[best_d2, e] = True
    load[best_d2] += w[e] - w[f]


@njit(cache=True)
def pack(h: np.ndarray, c: np.ndarray, num_devices: int, num_slots: int):
    """LPT without duplicates: h [E], c [E] -> (assign [N, S], load [N], holds [N, E])."""
    num_experts = h.shape[0]
    w = h / c
    order = np.argsort(-w, kind="mergesort")  # stable: ties by expert id
    assign = np.full((num_devices, num_slots), -1, dtype=np.int64)
    fill = np.zeros(num_devices, dtype=np.int64)
    load = np.zeros(num_devices)
    holds = np.zeros((num_devices, num_experts), dtype=np.bool_)
    for e in order:
        for _ in range(c[e]):
            best = -1
            for d in range(num_devices):
                if fill[d] < num_slots and not holds[d, e] and (best < 0 or load[d] < load[best]):
                    best = d
            if best < 0:
                _repair(assign, fill, load, holds, w, e, num_slots)
                continue
            assign[best, fill[best]] = e
            fill[best] += 1
            holds[best, e] = True
            load[best] += w[e]
    return assign, load, holds


@njit(cache=True)
def loads_of(assign: np.ndarray, w: np.ndarray) -> np.ndarray:
    """assign [N, S], w [E] -> load [N]."""
    num_devices, num_slots = assign.shape
    load = np.zeros(num_devices)
    for d in range(num_devices):
        for s in range(num_slots):
            load[d] += w[assign[d, s]]
    return load


@njit(cache=True)
def improve(assign, load, holds, w, max_iter):
    """Swap local search on the peak device (in place).  -> number of swaps made."""
    zero = np.zeros(w.shape[0], dtype=np.int64)
    return improve_local(assign, load, holds, w, max_iter, zero, np.zeros(assign.shape[0], dtype=np.int64),
                         np.inf, 0.0)[0]


@njit(cache=True)
def improve_local(assign, load, holds, w, max_iter, home, node_of, budget, crossing):
    """Swap local search on the peak device (in place): best-improvement swaps that lower the peak
    device without lifting its partner to the old peak, keeping the load that runs on a replica away
    from its expert's home node (``home [E]``, ``node_of [N]``) within ``budget``.
    -> (swaps made, crossing load after)."""
    num_devices, num_slots = assign.shape
    done = 0
    for _ in range(max_iter):
        m = np.argmax(load)
        top = load[m]
        best_peak = top - _TOL * max(top, 1.0)
        bj, ba, bb = -1, -1, -1
        bcross = crossing
        for j in range(num_devices):
            if j == m:
                continue
            lj = load[j]
            if lj >= best_peak:
                continue
            for a in range(num_slots):
                ea = assign[m, a]
                wa = w[ea]
                if holds[j, ea]:
                    continue
                for b in range(num_slots):
                    eb = assign[j, b]
                    delta = wa - w[eb]
                    if delta <= 0.0:
                        continue
                    peak = max(top - delta, lj + delta)
                    if peak < best_peak and not holds[m, eb]:
                        cross = crossing
                        if node_of[m] != node_of[j]:
                            cross += wa * ((node_of[j] != home[ea]) - (node_of[m] != home[ea]))
                            cross += w[eb] * ((node_of[m] != home[eb]) - (node_of[j] != home[eb]))
                        if cross <= budget:
                            best_peak = peak
                            bj, ba, bb = j, a, b
                            bcross = cross
        if bj < 0:
            break
        ea = assign[m, ba]
        eb = assign[bj, bb]
        delta = w[ea] - w[eb]
        assign[m, ba] = eb
        assign[bj, bb] = ea
        holds[m, ea] = False
        holds[m, eb] = True
        holds[bj, eb] = False
        holds[bj, ea] = True
        load[m] -= delta
        load[bj] += delta
        crossing = bcross
        done += 1
    return done, crossing


@njit(cache=True)
def holds_of(assign, num_experts):
    """assign [N, S] -> holds [N, E]."""
    num_devices, num_slots = assign.shape
    holds = np.zeros((num_devices, num_experts), dtype=np.bool_)
    for d in range(num_devices):
        for s in range(num_slots):
            holds[d, assign[d, s]] = True
    return holds
