"""``flashlb``: joint replica allotment and placement by search, per layer (see ``joint.py``).

- global: water-filling allotment, LPT packing, swap local search on the peak device with 2-for-2
  exchanges where single swaps stall (``exchange.py``; without redundancy also from a balanced
  differencing start), re-allotment rounds; on small pools an exhaustive allotment search with
  branch-and-bound packing (the exact optimum of FlashLB's own example, 196.67);
- heat series [T, L, E]: the window-sum placement is then improved on the mean per-episode imbalance
  (``temporal.py``), so experts that are hot at different times may share a device;
- nodes and groups: ``locality=strict`` keeps every replica on its group's node (exact group-to-node
  partition); ``relaxed`` lets replicas of hot experts live on other nodes while at most ``cross_share``
  of all tokens (over all layers) cross nodes (``locality.py``);
- never worse than ``default`` on the window heat: a layer where default's peak is lower takes default's.
Everything is numba-compiled with ``cache=True``: only the first run on a machine compiles.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from eplbctl.metrics import device_loads, predicted_imbalance
from eplbctl.policies.base import Param, Policy, PolicyError, PolicyResult, Topology, check_inputs, window_heat
from eplbctl.policies.default import place_global, place_hierarchical
from eplbctl.policies.joint import solve_layers
from eplbctl.policies.locality import layer_budgets, place_relaxed, place_strict
from eplbctl.policies.temporal import improve_episodes


def _at_least(low: float):
    return lambda v: None if v >= low else f"must be >= {low}"


LOCALITY = ("auto", "global", "strict", "relaxed")


class FlashLBPolicy(Policy):
    """Joint replica allotment + placement by search with pruning; multi-episode and node-aware."""

    name: ClassVar[str] = "flashlb"
    summary: ClassVar[str] = (
        "joint allotment + placement search (tree search on small pools), multi-episode, node-aware"
    )
    params: ClassVar[dict[str, Param]] = {
        "rounds": Param("rounds", int, 8, "re-allotment rounds per layer", _at_least(0)),
        "width": Param("width", int, 4, "donor experts tried per re-allotment", _at_least(1)),
        "max_iter": Param("max_iter", int, 2000, "swap iterations per local search", _at_least(1)),
        "tree_slots": Param("tree_slots", int, 32, "tree search (exhaustive allotment) for P <= this",
                            _at_least(0)),
        "tree_nodes": Param("tree_nodes", int, 100000, "node budget per branch and bound", _at_least(0)),
        "tol": Param("tol", float, 1e-5, "stop when the peak is within this share of the mean", _at_least(0.0)),
        "locality": Param("locality", str, "auto", "auto | global | strict | relaxed (auto: strict when "
                          "nodes and groups are given)", lambda v: None if v in LOCALITY else f"one of {LOCALITY}"),
        "cross_share": Param("cross_share", float, 0.10, "relaxed: share of all tokens allowed to cross nodes",
                             lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]"),
        "episodes": Param("episodes", bool, True, "optimize the mean per-episode imbalance of a heat series"),
        "episode_iter": Param("episode_iter", int, 500, "swap iterations on the episode objective", _at_least(0)),
    }

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self.crossing: np.ndarray | None = None  # [L] crossing share of the last relaxed placement

    def _args(self) -> tuple:
        v = self.values
        return (v["rounds"], v["width"], v["max_iter"], v["tree_slots"], v["tree_nodes"], v["tol"])

    def _mode(self, topo: Topology) -> str:
        loc = self.values["locality"]
        if loc == "auto":
            return "hierarchical" if topo.hierarchical else "global"
        if loc in ("strict", "relaxed") and not topo.hierarchical:
            raise PolicyError(f"flashlb: locality={loc} needs a topology with nodes and groups")
        return "hierarchical" if loc == "strict" else loc

    def place(self, heat: np.ndarray, current: np.ndarray, topo: Topology) -> PolicyResult:
        heat, current = check_inputs(heat, current, topo)
        window = np.ascontiguousarray(window_heat(heat))  # [L, E]
        n, s = topo.num_devices, topo.slots_per_device
        mode = self._mode(topo)
        self.crossing = None
        if mode == "global":
            out = solve_layers(window, n, s, *self._args())
            reference = place_global(window, n, s)
        else:
            nodes, groups = int(topo.num_nodes), int(topo.num_groups)
            reference = place_hierarchical(window, n, s, nodes, groups)
            if mode == "hierarchical":
                out = np.stack([place_strict(row, n, s, nodes, groups, self._args()) for row in window])
            else:
                share = layer_budgets(window, nodes, groups, self.values["cross_share"])
                pairs = [place_relaxed(row, n, s, nodes, groups, b, self._args())
                         for row, b in zip(window, share, strict=True)]
                out = np.stack([a for a, _ in pairs])
                self.crossing = np.array([c for _, c in pairs])
                reference = out  # default cannot cross nodes; compare with strict instead
        if heat.ndim == 3 and heat.shape[0] > 1 and self.values["episodes"] and mode == "global":
            out = self._episodes(heat, out)
        else:  # never worse than default on the window heat
            worse = device_loads(out, window).max(axis=1) > device_loads(reference, window).max(axis=1)
            out[worse] = reference[worse]
        out = out.astype(np.int64)
        change = predicted_imbalance(out, window) < predicted_imbalance(current, window) * (1 - 1e-12)
        label = mode
        if self.crossing is not None:
            total = window.sum(axis=1)
            label = f"relaxed (crossing {float((self.crossing * total).sum() / max(total.sum(), 1e-300)):.1%})"
        return PolicyResult(placement=out, change=change, mode=label)

    def _episodes(self, heat: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Improve each layer's window-sum placement on the mean per-episode imbalance of heat [T, L, E]."""
        num_experts = heat.shape[2]
        for layer in range(out.shape[0]):
            counts = np.bincount(out[layer].ravel(), minlength=num_experts).astype(np.int64)
            improve_episodes(out[layer], np.ascontiguousarray(heat[:, layer, :]), counts,
                             self.values["episode_iter"])
        return out
