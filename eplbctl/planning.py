"""Planning: run a policy on chosen layers, make its answer cheap to apply, and keep only what pays.

make_plan(heat, current, topo, policy, layers, min_gain, bytes_per_expert) -> Plan
  1. the policy places the selected layers (heat [L, E] or [T, L, E]; current [L, N, S]);
  2. movement-aware finishing, for every policy's output (neither step changes any device's load):
     a. new per-device expert sets are matched to current devices to maximize the experts already
        present (an assignment problem on overlap counts; within nodes in hierarchical mode);
     b. on each device, experts that stay keep their slot; incoming experts fill the freed slots
        in ascending slot order, ascending expert id;
  3. gain gate: a layer is applied only when the policy says change and before - after > min_gain;
     otherwise its row stays equal to `current`.
LayerPlan describes the row that the plan holds: for a layer not applied, after == before, moves == 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from eplbctl.metrics import predicted_imbalance, summarize
from eplbctl.placement import count_moves
from eplbctl.policies.base import Policy, PolicyError, Topology, check_inputs, check_result


class PlanError(PolicyError):
    """Planning arguments that cannot be used (layers, min_gain, bytes_per_expert)."""


@dataclass
class LayerPlan:
    layer: int
    before: float  # predicted imbalance of `current`
    after: float  # predicted imbalance of the plan's row (== before when not applied)
    moves: int  # expert weight copies that cross devices
    bytes: int  # moves * bytes_per_expert
    change: bool  # the layer is applied


@dataclass
class Plan:
    placement: np.ndarray  # [L, N, S]; rows of unselected or unchanged layers equal `current`
    layers: list[LayerPlan]  # one per selected layer
    policy: str
    mode: str
    seconds: float

    @property
    def changed_layers(self) -> list[int]:
        return [lp.layer for lp in self.layers if lp.change]

    def to_report(self) -> dict[str, Any]:
        """PlanReport of docs/protocol.md: plain Python types only (it goes over msgpack)."""
        rows = [
            {"layer": int(lp.layer), "before": float(lp.before), "after": float(lp.after),
             "moves": int(lp.moves), "bytes": int(lp.bytes), "change": bool(lp.change)}
            for lp in self.layers
        ]
        return {
            "policy": str(self.policy),
            "mode": str(self.mode),
            "seconds": float(self.seconds),
            "layers": rows,
            "summary": {
                "before": summarize(np.array([r["before"] for r in rows])),
                "after": summarize(np.array([r["after"] for r in rows])),
                "moves": sum(r["moves"] for r in rows),
                "bytes": sum(r["bytes"] for r in rows),
            },
        }


def _select_layers(layers: list[int] | None, num_layers: int) -> np.ndarray:
    """-> ascending unique layer ids [K] int64."""
    if layers is None:
        return np.arange(num_layers, dtype=np.int64)
    sel = np.asarray(list(layers))
    if sel.size and not np.issubdtype(sel.dtype, np.integer):
        raise PlanError(f"layer ids must be integers, got {list(layers)!r}")
    bad = sel[(sel < 0) | (sel >= num_layers)]
    if bad.size:
        raise PlanError(f"layer {int(bad[0])} out of range: this model has MoE layers 0-{num_layers - 1}")
    return np.unique(sel).astype(np.int64)


def _overlap(new: np.ndarray, current: np.ndarray, num_experts: int) -> np.ndarray:
    """new, current [L, N, S] -> overlap [L, N, N]: experts new device i shares with current device j."""
    num_layers, num_devices, _ = current.shape
    layer = np.arange(num_layers)[:, None, None]
    held = np.zeros((num_layers, num_experts, num_devices), dtype=np.uint8)  # [L, E, N] current holders
    held[layer, current, np.arange(num_devices)[None, :, None]] = 1
    return held[layer, new].sum(axis=2, dtype=np.int64)  # [L, N, S, N] -> [L, N, N]


def _assign(overlap: np.ndarray) -> np.ndarray:
    """overlap [n, n] (new x current) -> perm [n]: current device j receives new device perm[j].

    Maximizes the total overlap; among maximal assignments it prefers keeping a device's own set
    (a bonus below 1 in total on the diagonal), so an unchanged layer maps onto itself.
    """
    n = overlap.shape[0]
    score = overlap + np.eye(n) / (n + 1)
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return perm


def match_devices(new: np.ndarray, current: np.ndarray, num_experts: int, nodes: int | None) -> np.ndarray:
    """Permute devices of new [L, N, S] to keep most experts where they are -> [L, N, S].

    With nodes, whole nodes are matched first, then devices within each matched pair of nodes, so a
    hierarchical placement stays hierarchical.
    """
    num_layers, num_devices, _ = new.shape
    overlap = _overlap(new, current, num_experts)  # [L, N, N]
    k = nodes or 1
    per = num_devices // k
    out = np.empty_like(new)
    for layer in range(num_layers):
        blocks = overlap[layer].reshape(k, per, k, per)  # [new node, dev, cur node, dev]
        node_perm = _assign(blocks.sum(axis=(1, 3)))  # current node b receives new node node_perm[b]
        for b in range(k):
            a = node_perm[b]
            dev_perm = _assign(blocks[a, :, b, :])
            out[layer, b * per:(b + 1) * per] = new[layer, a * per + dev_perm]
    return out


def keep_slots(new: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Reorder slots within each device of new [L, N, S]: staying experts keep their slot -> [L, N, S]."""
    slots = new.shape[2]
    stays = (current[..., :, None] == new[..., None, :]).any(axis=3)  # [L, N, S] current slot kept
    incoming = ~(new[..., :, None] == current[..., None, :]).any(axis=3)  # [L, N, S] new expert arrives
    big = np.iinfo(np.int64).max
    arriving = np.sort(np.where(incoming, new, big), axis=2)  # incoming ids ascending, then padding
    free_first = np.argsort(stays * slots + np.arange(slots), axis=2)  # freed slots ascending, then kept
    n_in = incoming.sum(axis=2, keepdims=True)  # [L, N, 1]
    rank = np.arange(slots)
    values = np.where(rank < n_in, arriving, np.take_along_axis(current, free_first, axis=2))
    out = current.copy()
    np.put_along_axis(out, free_first, values, axis=2)
    return out


def make_plan(
    heat: np.ndarray,
    current: np.ndarray,
    topo: Topology,
    policy: Policy,
    layers: list[int] | None = None,
    min_gain: float = 0.0,
    bytes_per_expert: int = 0,
) -> Plan:
    """Run `policy` on `layers` (all when None) and return the plan that is worth applying."""
    start = time.perf_counter()
    heat, current = check_inputs(heat, current, topo)
    if not np.isfinite(min_gain) or min_gain < 0:
        raise PlanError(f"min_gain must be a finite number >= 0 (got {min_gain!r})")
    if int(bytes_per_expert) != bytes_per_expert or bytes_per_expert < 0:
        raise PlanError(f"bytes_per_expert must be an integer >= 0 (got {bytes_per_expert!r})")
    num_layers, num_experts = heat.shape[-2:]
    window = heat.sum(axis=0) if heat.ndim == 3 else heat  # [L, E]
    sel = _select_layers(layers, num_layers)
    placement = current.copy()
    if sel.size == 0:
        return Plan(placement, [], policy.name, "none", time.perf_counter() - start)

    sub_heat = heat[:, sel] if heat.ndim == 3 else heat[sel]
    sub_current = current[sel]
    try:
        result = policy.place(sub_heat, sub_current, topo)
    except PolicyError:
        raise
    except Exception as exc:  # a policy bug must reach the operator as one line, not hang or crash the caller
        raise PolicyError(f"policy {policy.name!r} failed: {type(exc).__name__}: {exc}") from exc
    result = check_result(result, num_experts, sub_current.shape, policy.name)

    nodes = topo.num_nodes if result.mode.startswith(("hierarchical", "relaxed")) else None
    finished = keep_slots(match_devices(result.placement, sub_current, num_experts, nodes), sub_current)
    before = predicted_imbalance(sub_current, window[sel])
    after = predicted_imbalance(finished, window[sel])
    apply = result.change & (before - after > min_gain)
    finished[~apply] = sub_current[~apply]
    after = np.where(apply, after, before)
    moves = count_moves(sub_current, finished)
    placement[sel] = finished

    plans = [
        LayerPlan(int(layer), float(b), float(a), int(m), int(m) * int(bytes_per_expert), bool(c))
        for layer, b, a, m, c in zip(sel, before, after, moves, apply, strict=True)
    ]
    return Plan(placement, plans, policy.name, result.mode, time.perf_counter() - start)
