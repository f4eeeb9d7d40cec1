"""``exact``: the mixed-integer optimum of one layer (scipy's HiGHS), the test oracle for small instances.

Model (per layer; heat scaled to max 1 for the solver):
  y[e, k] in {0, 1}     expert e has exactly k replicas (k = 1..K, K = min(N, P - E + 1))
  z[e, n, k] in {0, 1}  device n holds a replica of e and e has k replicas
  sum_k y[e, k] = 1;  sum_n z[e, n, k] = k y[e, k];  sum_k z[e, n, k] <= 1 (one replica per device);
  sum_{e,k} z[e, n, k] = S;  load_n = sum_{e,k} h_e / k z[e, n, k] <= M
  minimize M.
Optimal means within HiGHS's relative gap (1e-4). flashlb's placement seeds the cut M <= its peak and is
kept when the MILP finds nothing better. Instances with more than ``max_vars`` binaries are refused.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from eplbctl.metrics import device_loads, predicted_imbalance
from eplbctl.policies.base import Param, Policy, PolicyError, PolicyResult, Topology, check_inputs, window_heat
from eplbctl.policies.joint import solve_layers

_GAP = 1e-4  # HiGHS's default relative MIP gap: "optimal" means within this share of the bound


class ExactTooLarge(PolicyError):
    """The instance is beyond what the MILP solves in reasonable time."""


def milp_size(num_experts: int, num_devices: int, slots: int) -> int:
    """Number of binaries of the model for one layer."""
    k = min(num_devices, num_devices * slots - num_experts + 1)
    return num_experts * num_devices * k + num_experts * k


def solve_exact(h: np.ndarray, num_devices: int, slots: int, time_limit: float,
                incumbent: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """h [E] -> (assign [N, S], proven optimal). ``incumbent`` [N, S]: a known placement whose peak cuts M;
    it is returned when HiGHS finds nothing at least as good (proven optimal when its bound meets it).
    Raises PolicyError when HiGHS finds no solution and there is no incumbent."""
    num_experts = len(h)
    cap = min(num_devices, num_devices * slots - num_experts + 1)
    scale = h.max() if h.max() > 0 else 1.0
    hs = h / scale
    nz = num_experts * num_devices * cap
    ny = num_experts * cap
    nvar = nz + ny + 1  # z, y, M

    def zi(e: int, n: int, k: int) -> int:
        return (e * num_devices + n) * cap + (k - 1)

    def yi(e: int, k: int) -> int:
        return nz + e * cap + (k - 1)

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries: list[tuple[int, float]], low: float, high: float) -> None:
        nonlocal r
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lo.append(low)
        hi.append(high)
        r += 1

    ks = range(1, cap + 1)
    for e in range(num_experts):
        add([(yi(e, k), 1.0) for k in ks], 1, 1)
        for k in ks:
            add([(zi(e, n, k), 1.0) for n in range(num_devices)] + [(yi(e, k), -float(k))], 0, 0)
        for n in range(num_devices):
            add([(zi(e, n, k), 1.0) for k in ks], 0, 1)
    load = [[(zi(e, n, k), hs[e] / k) for e in range(num_experts) for k in ks] for n in range(num_devices)]
    for n in range(num_devices):
        add([(zi(e, n, k), 1.0) for e in range(num_experts) for k in ks], slots, slots)
        add([*load[n], (nvar - 1, -1.0)], -np.inf, 0)
    matrix = coo_matrix((vals, (rows, cols)), shape=(r, nvar)).tocsr()
    cost = np.zeros(nvar)
    cost[-1] = 1.0
    integrality = np.ones(nvar)
    integrality[-1] = 0
    high = np.ones(nvar)
    upper = np.inf
    if incumbent is not None:
        upper = float(device_loads(incumbent[None], h[None]).max()) / scale
    if upper <= hs.sum() / num_devices * (1 + _GAP):  # the incumbent meets the mean bound: done
        return incumbent, True
    high[-1] = upper * (1 + 1e-9) + 1e-12
    low = np.zeros(nvar)
    low[-1] = hs.sum() / num_devices  # the mean device load
    res = milp(cost, constraints=LinearConstraint(matrix, lo, hi), integrality=integrality,
               bounds=Bounds(low, high), options={"time_limit": time_limit, "disp": False})
    if res.x is None and incumbent is not None:
        bound = getattr(res, "mip_dual_bound", None)
        proven = res.status == 2 or (bound is not None and bound >= upper / (1 + _GAP))
        return incumbent, bool(proven)
    if res.x is None:
        raise PolicyError(f"exact: HiGHS found no placement within {time_limit:g} s ({res.message})")
    z = np.round(res.x[:nz]).reshape(num_experts, num_devices, cap).sum(axis=2) > 0.5  # [E, N]
    assign = np.array([np.flatnonzero(z[:, n]) for n in range(num_devices)], dtype=np.int64)
    return assign, bool(res.status == 0)


class ExactPolicy(Policy):
    """Mixed-integer optimum of every layer (scipy HiGHS); for small instances and as the test oracle."""

    name: ClassVar[str] = "exact"
    summary: ClassVar[str] = "MILP optimum (HiGHS) of the peak device load; small instances only"
    params: ClassVar[dict[str, Param]] = {
        "time_limit": Param("time_limit", float, 30.0, "seconds per layer for HiGHS",
                            lambda v: None if v > 0 else "must be > 0"),
        "max_vars": Param("max_vars", int, 4000, "refuse layers whose model has more binaries than this",
                          lambda v: None if v >= 1 else "must be >= 1"),
    }

    def place(self, heat: np.ndarray, current: np.ndarray, topo: Topology) -> PolicyResult:
        heat, current = check_inputs(heat, current, topo)
        window = window_heat(heat)  # [L, E]
        n, s = topo.num_devices, topo.slots_per_device
        size = milp_size(window.shape[1], n, s)
        if size > self.values["max_vars"]:
            raise ExactTooLarge(
                f"exact: {window.shape[1]} experts on {n} devices x {s} slots need {size} binaries per layer, "
                f"more than max_vars={self.values['max_vars']}; use flashlb (or raise max_vars)")
        out = np.empty_like(current)
        proven = True
        # flashlb's placement is feasible: its peak cuts M without changing the optimum
        start = solve_layers(np.ascontiguousarray(window), n, s, 8, 4, 2000, 32, 100000, 1e-5)
        for layer in range(len(window)):
            out[layer], ok = solve_exact(window[layer], n, s, self.values["time_limit"], start[layer])
            proven &= ok
        change = predicted_imbalance(out, window) < predicted_imbalance(current, window) * (1 - 1e-9)
        return PolicyResult(placement=out, change=change, mode="global" if proven else "global (time limit hit)")
