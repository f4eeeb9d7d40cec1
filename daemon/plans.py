"""Previewed plans, kept so that the plan an operator confirms is the plan that runs.

A dry run stores the rows it planned for its layers and the rows they were planned from; applying
the plan by its id queues exactly those rows, or is refused when any of those layers changed since
(another job ran), so a confirmation never silently applies a plan made on newer heat.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from eplbctl.protocol import RequestError

PLAN_TTL_S = 600.0     # long enough to read a preview and answer the prompt
PLAN_KEEP = 8          # previews are small, but a loop of dry runs must not grow the daemon


@dataclass(frozen=True)
class StoredPlan:
    plan_id: str
    created: float
    layers: list[int]          # the layers the plan was made for (chosen by --auto or given)
    base: np.ndarray           # [len(layers), N, S] their placement when planned
    rows: np.ndarray           # [len(layers), N, S] the planned placement
    report: dict               # PlanReport, with this plan_id


def stale(message: str) -> RequestError:
    # A conflict with the daemon's state, not a bad value: previewing again is the remedy.
    return RequestError(409, message, {"plan_stale": True})


class PlanStore:
    """The last `keep` previews, each usable once within `ttl_s`; thread-safe."""

    def __init__(self, ttl_s: float = PLAN_TTL_S, keep: int = PLAN_KEEP,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.keep = keep
        self._clock = clock
        self._lock = threading.Lock()
        self._plans: collections.OrderedDict[str, StoredPlan] = collections.OrderedDict()

    def add(self, layers: list[int], current: np.ndarray, placement: np.ndarray, report: dict) -> str:
        """Keep the plan `placement` [L, N, S] made from `current` for `layers`; -> its plan_id."""
        plan_id = uuid.uuid4().hex
        idx = list(layers)
        plan = StoredPlan(plan_id, self._clock(), idx, current[idx].copy(), placement[idx].copy(),
                          {**report, "plan_id": plan_id})
        with self._lock:
            self._expire()
            self._plans[plan_id] = plan
            while len(self._plans) > self.keep:
                self._plans.popitem(last=False)
        return plan_id

    def take(self, plan_id: str, current: np.ndarray) -> StoredPlan:
        """The plan, removed from the store, if every one of its layers is still as it was planned
        from; else a 409 RequestError with `plan_stale` (the plan is dropped: it cannot become valid)."""
        with self._lock:
            self._expire()
            plan = self._plans.pop(plan_id, None)
        if plan is None:
            raise stale(f"plan {plan_id} is unknown or expired (previews are kept {self.ttl_s:g} s, the last "
                        f"{self.keep}, and apply once)")
        moved = [la for la, base in zip(plan.layers, plan.base, strict=True) if not np.array_equal(current[la], base)]
        if moved:
            raise stale(f"the placement of layer(s) {', '.join(map(str, moved))} changed since plan {plan_id} "
                        "was previewed")
        return plan

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    def _expire(self) -> None:
        limit = self._clock() - self.ttl_s
        for plan_id in [p.plan_id for p in self._plans.values() if p.created < limit]:
            del self._plans[plan_id]
