"""``exact``: the mixed-integer optimum of one layer (scipy's HiGHS), the test oracle for small instances.

Model (per layer; heat scaled to max 1 for the solver):
  y[e, k] in {0, 1}     expert e has exactly k replicas (k = 1..K, K = min(N, P - E + 1))
  z[e, n, k] in {0, 1}  device n holds a replica of e and e has k replicas
  sum_k y[e, k] = 1;  sum_n z[e, n, k] = k y[e, k];  sum_k z[e, n, k] <= 1 (one replica per device);
  sum_{e,k} z[e, n, k] = S;  load_n = sum_{e,k} h_e / k z[e, n, k] <= M;  load_n >= load_{n+1} (symmetry)
  minimize M.
Instances with more than ``max_vars`` binaries are refused with the size and the limit in the message.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from eplbctl.metrics import predicted_imbalance
from eplbctl.policies.base import Param, Policy, PolicyError, PolicyResult, Topology, check_inputs, window_heat


class ExactTooLarge(PolicyError):
    """The instance is beyond what the MILP solves in reasonable time."""


def milp_size(num_experts: int, num_devices: int, slots: int) -> int:
    """Number of binaries of the model for one layer."""
    k = min(num_devices, num_devices * slots - num_experts + 1)
    return num_experts * num_devices * k + num_experts * k


def solve_exact(h: np.ndarray, num_devices: int, slots: int, time_limit: float) -> tuple[np.ndarray, bool]:
    """h [E] -> (assign [N, S], proven optimal). Raises PolicyError when HiGHS finds no solution."""
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
        if n + 1 < num_devices:
            add(load[n] + [(c, -v) for c, v in load[n + 1]], 0, np.inf)
    matrix = coo_matrix((vals, (rows, cols)), shape=(r, nvar)).tocsr()
    cost = np.zeros(nvar)
    cost[-1] = 1.0
    integrality = np.ones(nvar)
    integrality[-1] = 0
    upper = np.ones(nvar)
    upper[-1] = np.inf
    res = milp(cost, constraints=LinearConstraint(matrix, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), upper), options={"time_limit": time_limit, "disp": False})
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
        "time_limit": Param("time_limit", float, 10.0, "seconds per layer for HiGHS",
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
        for layer in range(len(window)):
            out[layer], ok = solve_exact(window[layer], n, s, self.values["time_limit"])
            proven &= ok
        change = predicted_imbalance(out, window) < predicted_imbalance(current, window) * (1 - 1e-9)
        return PolicyResult(placement=out, change=change, mode="global" if proven else "global (time limit hit)")
