"""Default policy: DeepSeek-style replicate-then-pack, without duplicates and without ties left to chance.

Global mode (one pool of N devices):
  1. replicate: each of the R redundant slots goes to the expert with the highest heat per replica
     (heat / count), at most N replicas per expert (one per device);
  2. pack: replicas, heaviest first, go to the lightest device that has a free slot and does not
     already hold that expert.
Hierarchical mode (DeepSeek's scheme, when the topology names nodes and groups):
  1. pack the expert groups onto nodes (each node gets groups / nodes groups, heaviest group first);
  2. replicate within each node (P / nodes slots, at most N / nodes replicas per expert);
  3. pack each node's replicas onto that node's devices.

Ties are broken explicitly everywhere: replicas go to (heat per replica desc, count asc, id asc), so
zero-heat layers get their redundant slots round-robin; items are packed in (weight desc, id asc)
order; devices are chosen by (load asc, index asc).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from eplbctl.metrics import predicted_imbalance
from eplbctl.policies.base import Param, Policy, PolicyResult, Topology, check_inputs, window_heat


def _before(key: np.ndarray, tie: np.ndarray, a: int, b: int) -> bool:
    """Heap order: (key asc, tie asc, index asc) -- a total order, so no tie is left to chance."""
    if key[a] != key[b]:
        return key[a] < key[b]
    if tie[a] != tie[b]:
        return tie[a] < tie[b]
    return a < b


def _sift_down(heap: np.ndarray, size: int, pos: int, key: np.ndarray, tie: np.ndarray) -> None:
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        if child + 1 < size and _before(key, tie, heap[child + 1], heap[child]):
            child += 1
        if not _before(key, tie, heap[child], heap[pos]):
            return
        heap[pos], heap[child] = heap[child], heap[pos]
        pos = child


def _push(heap: np.ndarray, size: int, item: int, key: np.ndarray, tie: np.ndarray) -> int:
    """Insert item into heap[:size] -> new size."""
    pos = size
    heap[pos] = item
    while pos > 0:
        parent = (pos - 1) // 2
        if not _before(key, tie, heap[pos], heap[parent]):
            break
        heap[pos], heap[parent] = heap[parent], heap[pos]
        pos = parent
    return size + 1


def _pop(heap: np.ndarray, size: int, key: np.ndarray, tie: np.ndarray) -> int:
    """Remove heap[0] -> new size."""
    size -= 1
    heap[0] = heap[size]
    _sift_down(heap, size, 0, key, tie)
    return size


def _replicate_rows(weight: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """weight [M, K] float64 -> counts [M, K] int64 summing to num_slots per row, each in [1, cap].

    Each redundant slot goes to the expert first in (heat per replica desc, count asc, id asc).
    """
    rows, k = weight.shape
    counts = np.ones((rows, k), dtype=np.int64)
    key = np.empty(k)  # -heat per replica
    heap = np.empty(k, dtype=np.int64)
    for r in range(rows):
        size = 0
        for e in range(k):
            key[e] = -weight[r, e]
            if cap > 1:
                size = _push(heap, size, e, key, counts[r])
        for _ in range(num_slots - k):
            e = heap[0]
            counts[r, e] += 1
            key[e] = -weight[r, e] / counts[r, e]
            if counts[r, e] >= cap:
                size = _pop(heap, size, key, counts[r])
            else:
                _sift_down(heap, size, 0, key, counts[r])
    return counts


def _pack_rows(
    weight: np.ndarray, ids: np.ndarray, counts: np.ndarray, num_bins: int, slots: int
) -> np.ndarray:
    """Pack replicas into bins, items already in packing order.

    weight [M, K] per-replica weight, ids [M, K] expert ids, counts [M, K] replicas, sorted per row by
    (weight desc, id asc) -> out [M, num_bins, slots] expert ids, no expert twice in one bin.
    Bins come from a heap in (load asc, index asc) order; bins that already hold the current expert
    are set aside until its replicas are placed.
    """
    rows, k = weight.shape
    out = np.full((rows, num_bins, slots), -1, dtype=np.int64)
    item_w = np.zeros((num_bins, slots))
    load = np.zeros(num_bins)
    fill = np.zeros(num_bins, dtype=np.int64)
    zero = np.zeros(num_bins, dtype=np.int64)
    heap = np.empty(num_bins, dtype=np.int64)
    aside = np.empty(num_bins, dtype=np.int64)
    for r in range(rows):
        load[:] = 0.0
        fill[:] = 0
        size = 0
        for b in range(num_bins):
            size = _push(heap, size, b, load, zero)
        for j in range(k):
            e = ids[r, j]
            w = weight[r, j]
            held = 0
            for _ in range(counts[r, j]):
                if size == 0:  # every bin with room already holds e
                    best = _make_room(out[r], item_w, load, fill, e, slots)
                else:
                    best = heap[0]
                    size = _pop(heap, size, load, zero)
                out[r, best, fill[best]] = e
                item_w[best, fill[best]] = w
                load[best] += w
                fill[best] += 1
                if fill[best] < slots:
                    aside[held] = best
                    held += 1
            for i in range(held):
                if fill[aside[i]] < slots:  # _make_room may have filled one
                    size = _push(heap, size, aside[i], load, zero)
    return out


def _holds(row: np.ndarray, used: int, expert: int) -> bool:
    for s in range(used):
        if row[s] == expert:
            return True
    return False


def _make_room(out: np.ndarray, item_w: np.ndarray, load: np.ndarray, fill: np.ndarray,
               expert: int, slots: int) -> int:
    """Every bin with a free slot already holds `expert`: move one item out of a full bin that does not.

    out [B, S] one row's bins. The lightest bin with room (`dst`) takes the lightest item of the
    lightest full bin without `expert` (`src`) that `dst` does not hold; `src` then has a free slot.
    Such an item exists: `src` holds S distinct experts, `dst` at most S - 1.  -> src.
    """
    num_bins = out.shape[0]
    dst = -1
    src = -1
    for b in range(num_bins):
        if fill[b] < slots:
            if dst < 0 or load[b] < load[dst]:
                dst = b
        elif not _holds(out[b], fill[b], expert):
            if src < 0 or load[b] < load[src]:
                src = b
    pick = -1
    for s in range(slots):
        if _holds(out[dst], fill[dst], out[src, s]):
            continue
        if pick < 0 or item_w[src, s] < item_w[src, pick]:
            pick = s
    moved_w = item_w[src, pick]
    out[dst, fill[dst]] = out[src, pick]
    item_w[dst, fill[dst]] = moved_w
    load[dst] += moved_w
    fill[dst] += 1
    last = fill[src] - 1  # close the gap in src so its free slot is at the end
    out[src, pick] = out[src, last]
    item_w[src, pick] = item_w[src, last]
    load[src] -= moved_w
    fill[src] = last
    return src


_KERNELS = ("_before", "_sift_down", "_push", "_pop", "_replicate_rows", "_pack_rows", "_holds", "_make_room")
_compiled = False


def _jit() -> None:
    """Compile the kernels above with numba on first use (cached on disk), so that importing the
    registry (every CLI command) does not pay numba's import. Kernels call each other through these
    module globals, which numba resolves when it compiles."""
    global _compiled
    if _compiled:
        return
    from numba import njit

    module = globals()
    for name in _KERNELS:
        module[name] = njit(cache=True)(module[name])
    _compiled = True


def _place_rows(weight: np.ndarray, ids: np.ndarray, num_bins: int, slots: int) -> np.ndarray:
    """One pool per row: weight [M, K] heat of experts ids [M, K] (ascending per row) -> [M, bins, slots]."""
    _jit()
    counts = _replicate_rows(weight, num_bins * slots, num_bins)  # [M, K]
    per_replica = weight / counts  # [M, K]
    order = np.lexsort((ids, -per_replica), axis=-1)  # (weight desc, id asc): a total order
    sorted_w, sorted_ids, sorted_counts = (
        np.ascontiguousarray(np.take_along_axis(a, order, axis=-1)) for a in (per_replica, ids, counts)
    )
    return _pack_rows(sorted_w, sorted_ids, sorted_counts, num_bins, slots)


def place_global(heat: np.ndarray, num_devices: int, slots: int) -> np.ndarray:
    """heat [L, E] -> phy2log [L, N, S]."""
    num_experts = heat.shape[1]
    ids = np.broadcast_to(np.arange(num_experts, dtype=np.int64), heat.shape)
    return _place_rows(np.ascontiguousarray(heat), np.ascontiguousarray(ids), num_devices, slots)


def place_hierarchical(heat: np.ndarray, num_devices: int, slots: int, nodes: int, groups: int) -> np.ndarray:
    """heat [L, E] -> phy2log [L, N, S]; node n's devices hold only the experts of node n's groups."""
    num_layers, num_experts = heat.shape
    group_size = num_experts // groups
    group_heat = heat.reshape(num_layers, groups, group_size).sum(axis=2)  # [L, G]
    node_groups = _place_rows_single(group_heat, nodes, groups // nodes)  # [L, nodes, G/nodes]
    node_groups = np.sort(node_groups, axis=2)
    # ids [L, nodes, E/nodes]: ascending expert ids of each node's groups
    ids = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, nodes, -1)
    flat_ids = ids.reshape(num_layers * nodes, -1)
    weight = np.take_along_axis(heat, ids.reshape(num_layers, -1), axis=1).reshape(flat_ids.shape)
    per_node = _place_rows(np.ascontiguousarray(weight), flat_ids, num_devices // nodes, slots)
    return per_node.reshape(num_layers, num_devices, slots)


def _place_rows_single(weight: np.ndarray, num_bins: int, slots: int) -> np.ndarray:
    """Balanced packing of single items: weight [M, K] with K = bins * slots -> item ids [M, bins, slots]."""
    _jit()
    ids = np.broadcast_to(np.arange(weight.shape[1], dtype=np.int64), weight.shape)
    order = np.lexsort((ids, -weight), axis=-1)
    return _pack_rows(
        np.ascontiguousarray(np.take_along_axis(weight, order, axis=-1)),
        np.ascontiguousarray(np.take_along_axis(ids, order, axis=-1)),
        np.ones(weight.shape, dtype=np.int64),
        num_bins,
        slots,
    )


class DefaultPolicy(Policy):
    """Replicate the hottest experts, then pack heaviest-first onto the lightest device (DeepSeek EPLB)."""

    name: ClassVar[str] = "default"
    summary: ClassVar[str] = (
        "DeepSeek-style replicate-then-pack; hierarchical (groups to nodes) when nodes and groups are given"
    )
    params: ClassVar[dict[str, Param]] = {}

    def place(self, heat: np.ndarray, current: np.ndarray, topo: Topology) -> PolicyResult:
        heat, current = check_inputs(heat, current, topo)
        window = window_heat(heat)  # [L, E]
        n, s = topo.num_devices, topo.slots_per_device
        if topo.hierarchical:
            placement = place_hierarchical(window, n, s, int(topo.num_nodes), int(topo.num_groups))
            mode = "hierarchical"
        else:
            placement = place_global(window, n, s)
            mode = "global"
        change = predicted_imbalance(placement, window) < predicted_imbalance(current, window)
        return PolicyResult(placement=placement, change=change, mode=mode)
