"""What each redeployment cost, per phase, from the per-rank figures gathered at the ticks.

Per layer: bytes moved (received, summed over ranks), transfer time (launch to verified, the
slowest rank), achieved GB/s, the stall the layer added to its forward step (step time minus the
median step time without transfers, the slowest rank, shared among the layers of that step) and the
commit time. Per job: heat gather, policy, plan, commit, stall and wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# per in-flight layer: layer, bytes_recv, bytes_sent, transfer_ns, commit_ns, plan_ns, ok, err, verify_ns
STAT_FIELDS = 9
ERR_CODES = {"transfer": 1, "capacity": 2, "verify": 3, "timeout": 4}
ERR_NAMES = {1: "transfer failed (a peer broke the connection)", 2: "not enough staging slots",
             3: "checksum mismatch: a received expert is corrupted or came from a wrong slot",
             4: "transfer timed out (a peer is dead or hung)"}


@dataclass
class LayerOutcome:
    layer: int
    ok: bool
    errors: list[str]            # "rank R: why" for every rank that voted no
    figures: dict                # the per_layer entry of a ProfileRecord


def layer_outcomes(stats: np.ndarray, layers_per_step: int) -> list[LayerOutcome]:
    """stats [N, K * STAT_FIELDS + 2] gathered at a tick -> one outcome per layer in flight."""
    per = stats[:, :layers_per_step * STAT_FIELDS].reshape(stats.shape[0], layers_per_step, STAT_FIELDS)
    step_ns, base_ns = stats[:, -2], stats[:, -1]
    in_flight = [k for k in range(layers_per_step) if per[0, k, 0] >= 0]
    stall_s = max(0.0, float((step_ns - base_ns).max()) / 1e9) / max(1, len(in_flight))
    out = []
    for k in in_flight:
        rows = per[:, k]                                   # [N, F]
        ok = bool(rows[:, 6].min() == 1)
        errors = [f"rank {r}: {ERR_NAMES.get(int(rows[r, 7]), 'failed')}"
                  for r in range(rows.shape[0]) if rows[r, 6] != 1 and rows[r, 7] > 0]
        nbytes = int(rows[:, 1].sum())
        # A negative time is an upper bound: no completion was seen (the layer failed), so the rank
        # measured up to the failure; the GB/s is then a lower bound.
        bound = bool((rows[:, 3] < 0).any())
        transfer_s = float(np.abs(rows[:, 3]).max()) / 1e9
        out.append(LayerOutcome(int(rows[0, 0]), ok, errors, {
            "layer": int(rows[0, 0]),
            "bytes": nbytes,
            "transfer_s": transfer_s,
            "gbps": nbytes / transfer_s / 1e9 if transfer_s > 0 else 0.0,
            "transfer_upper_bound": bound,
            "stall_s": stall_s,
            "verify_s": float(rows[:, 8].max()) / 1e9,
            "commit_s": float(rows[:, 4].max()) / 1e9,
            "plan_s": float(rows[:, 5].max()) / 1e9,
        }))
    return out


@dataclass
class JobProfile:
    job_id: int
    layers: list[int]
    gather_s: float = 0.0
    policy_s: float = 0.0
    started_at: float | None = None
    per_layer: list[dict] = field(default_factory=list)

    def record(self, finished_at: float) -> dict:
        """The ProfileRecord of docs/protocol.md."""
        total = finished_at - self.started_at if self.started_at is not None else 0.0
        return {
            "job_id": self.job_id,
            "layers": list(self.layers),
            "phases": {
                "gather_s": self.gather_s,
                "policy_s": self.policy_s,
                "plan_s": sum(p["plan_s"] for p in self.per_layer),
                "transfer_s": sum(p["transfer_s"] for p in self.per_layer),
                "verify_s": sum(p["verify_s"] for p in self.per_layer),
                "commit_s": sum(p["commit_s"] for p in self.per_layer),
                "stall_s": sum(p["stall_s"] for p in self.per_layer),
                "total_s": total,
            },
            "bytes": sum(p["bytes"] for p in self.per_layer),
            "per_layer": list(self.per_layer),
        }
