"""The coordinator's control plane: request handlers for the control server, and the agent's hooks.

The control server's threads call the handlers; the agent (forward thread of rank 0) calls the
`on_*` hooks at ticks and takes queued commands with `next_command`. The two sides share only
immutable snapshots, the job ledger (`jobs.py`) and the command queue, under one lock: no handler
ever touches a device tensor or waits on the forward path.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from eplbd.aggregator import HeatHistory
from eplbd.faults import Faults
from eplbd.fields import layer_list, rebalance_fields, str_field
from eplbd.jobs import JobBook, known
from eplbd.planner import PlanJob, Planner, PlannerError, PolicyRefused
from eplbd.plans import PlanStore
from eplbd.profiler import layer_outcomes

from eplbctl.metrics import measured_imbalance, predicted_imbalance, summarize, summarize_known
from eplbctl.policies.base import Topology
from eplbctl.protocol import RequestError

log = logging.getLogger("eplbd.control")
PROFILE_KEEP = 50


@dataclass(frozen=True)
class Snapshot:
    step: int
    tick: int
    placement: np.ndarray      # [L, N, S]
    slot_window: np.ndarray    # [L, N, S] counts since each layer's last change (within the window)
    heat_window: np.ndarray    # [L, E] logical heat over the window
    ticks_per_layer: np.ndarray
    last_change: np.ndarray    # [L] step of the last change, -1 never


class Control:
    def __init__(self, topo: Topology, num_experts: int, window_ticks: int, tokens_per_step: int,
                 layers_per_step: int, expert_bytes: int, memory: dict, planner: Planner,
                 policy: str = "default", threshold: float = 1.1, faults: Faults | None = None,
                 layer_ids: list[int] | None = None, staging_slots: int | None = None,
                 min_gain: float = 0.01) -> None:
        self.topo = topo
        self.num_experts = num_experts
        self.tokens_per_step = tokens_per_step
        self.layers_per_step = layers_per_step
        self.expert_bytes = expert_bytes
        self.memory = memory
        self.planner = planner
        self.policy, self.params, self.threshold = policy, {}, threshold
        self.faults = faults or Faults([])
        self.layer_ids = layer_ids
        self.staging_slots = staging_slots or topo.slots_per_device
        self.min_gain = min_gain
        self.history: HeatHistory | None = None
        self.window_ticks = window_ticks
        self._lock = threading.Lock()
        self._commands: collections.deque[dict] = collections.deque()
        self._snapshot: Snapshot | None = None
        self._last_change: np.ndarray | None = None
        self._tick_count = 0
        self.book = JobBook(PROFILE_KEEP)
        self._gather_s = 0.0          # the last tick's gather time, charged to the next job's profile
        self._planning = False
        self._request_ids = itertools.count(1)
        self._probe: dict[str, Any] = {}
        self._probe_waiters: dict[int, threading.Event] = {}
        self._predicted: tuple[int, str, np.ndarray] | None = None
        self.plans = PlanStore()
        self.fault: str | None = None
        self._fault_job: dict | None = None   # the job a fault failed: its error follows update_fault
        self.events: collections.deque[str] = collections.deque(maxlen=20)
        self.shutdown = threading.Event()
        self.step = 0

    # ---- hooks called by the agent on rank 0 ------------------------------------------------------

    def on_tick(self, step: int, steps: int, slot_counts: np.ndarray, placement_in_force: np.ndarray,
                placement_now: np.ndarray, stats: np.ndarray, gather_s: float, job_id: int | None) -> None:
        L = slot_counts.shape[0]
        if self.history is None:
            self.history = HeatHistory(L, self.num_experts, self.window_ticks)
            self._last_change = np.full(L, -1, dtype=np.int64)
        outcomes = layer_outcomes(stats, self.layers_per_step)
        with self._lock:     # status() reads the history's ticks from the server threads
            self.history.add(step, steps, slot_counts, placement_in_force)
            self._tick_count += 1
            self.step = step
            error = self.book.account(job_id, outcomes, step)
            if error:
                self.events.append(f"step {step}: job {job_id}: {error}")
            if any(out.ok for out in outcomes):
                self._last_change[[o.layer for o in outcomes if o.ok]] = step
            slots, heat = self._windows()
            self._snapshot = Snapshot(step, self._tick_count, placement_now.copy(), slots, heat[0],
                                      heat[1], self._last_change.copy())
            self.book.settle(self._snapshot.ticks_per_layer, self._snapshot.slot_window)
            self._gather_s = gather_s

    def _windows(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        slots, _, ticks = self.history.window(self._last_change)
        return slots, (self.history.full_window_heat(), ticks)

    def on_job_started(self, job_id: int, step: int) -> None:
        with self._lock:
            self.book.started(job_id, step)

    def on_probe(self, step: int, combined: str, baseline: bool, sums: np.ndarray, expert_sums: np.ndarray,
                 request_id: int | None) -> None:
        """sums [L, N, S, T] live slot checksums; expert_sums [L, E, T] what each expert must hash to."""
        placement = self._snapshot.placement if self._snapshot is not None else None
        with self._lock:
            if baseline:
                self._probe["baseline"] = combined
                self._probe["placement"] = None
            self._probe.update(current=combined, step=step, sums=sums, expert_sums=expert_sums)
            if placement is not None:
                expect = np.take_along_axis(expert_sums[:, None, :, :].repeat(placement.shape[1], 1),
                                            placement[..., None], axis=2)
                self._probe["weights_ok"] = bool(np.array_equal(expect, sums))
            event = self._probe_waiters.pop(request_id, None) if request_id is not None else None
        if event is not None:
            event.set()

    def next_command(self) -> dict | None:
        with self._lock:
            return self._commands.popleft() if self._commands else None

    def set_fault(self, message: str) -> None:
        """The deployment stopped (a rank died or hung): fail the running job, keep its profile."""
        with self._lock:
            if self.fault is None:
                self.events.append(message)
            self.fault = message
            job = self.book.active_job()
            if job is not None:
                self.book.finish(job, "failed", self.step, message)
                self._fault_job = job

    def update_fault(self, message: str) -> None:
        """A better account of a fault already set (the launcher named the rank that caused it)."""
        with self._lock:
            if self.fault != message:
                # the job the fault failed tells the same, better account (it may come after rank 0's wait)
                job = self._fault_job
                if job is not None and job.get("error") == self.fault:
                    job["error"] = message
                self.fault = message
                self.events.append(message)

    # ---- request handlers (control server threads) --------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        return {"status": self.status, "rebalance": self.rebalance, "job": self.job, "profile": self.profile,
                "verify": self.verify, "inspect": self.inspect, "shutdown": self.request_shutdown}

    def _require_snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            raise RequestError(503, "no heat recorded yet; try again after the first control tick")
        return snap

    def _transfer_state(self) -> str:
        if self.fault:
            return "failed"
        if self._planning:
            return "planning"
        job = self.book.active_job()
        if job is None:
            return "idle"
        return "queued" if job["state"] == "queued" else "transferring"

    def status(self, content: dict) -> dict:
        snap = self._require_snapshot()
        L = snap.placement.shape[0]
        layers = layer_list(content.get("layers"), L) or list(range(L))
        measured = measured_imbalance(snap.slot_window)
        current = predicted_imbalance(snap.placement, snap.heat_window)
        predicted = self._predicted_after(snap)
        counts = _replicas(snap.placement, self.num_experts)
        rows = []
        for la in layers:
            rows.append({"layer": la, "model_layer": self.layer_ids[la] if self.layer_ids else la,
                         "measured": known(measured[la]), "current": float(current[la]),
                         "predicted": None if predicted is None else float(predicted[la]),
                         "replicated": int((counts[la] > 1).sum()), "max_replicas": int(counts[la].max()),
                         "last_change_step": None if snap.last_change[la] < 0 else int(snap.last_change[la]),
                         "window_tokens": int(snap.slot_window[la].sum())})
        with self._lock:
            job = self.book.active_job()
            job = dict(job) if job is not None else None
        return {"step": snap.step, "steps_recorded": self.history.steps_recorded,
                "tokens_per_step": self.tokens_per_step, "window_steps": self._window_steps(),
                "ranks": self.topo.num_devices, "experts": self.num_experts,
                "slots_per_device": self.topo.slots_per_device, "policy": self.policy,
                "threshold": self.threshold, "transfer": self._transfer_state(), "job": job,
                "fault": self.fault, "events": list(self.events),
                "summary": {"measured": summarize_known(measured[layers]),
                            "current": summarize(current[layers]),
                            "predicted": None if predicted is None else summarize(predicted[layers])},
                "layers": rows}

    def _window_steps(self) -> int:
        with self._lock:
            return sum(t.steps for t in self.history.ticks) if self.history else 0

    def _predicted_after(self, snap: Snapshot) -> np.ndarray | None:
        cached = self._predicted
        if cached is not None and cached[0] == snap.tick and cached[1] == self.policy:
            return cached[2]
        try:
            placement, _ = self.planner.plan(self._plan_job(snap, None, self.policy, self.params, 0.0),
                                             blocking=False)
        except PlannerError:
            return cached[2] if cached is not None else None
        if placement is None:        # the planner is busy with a rebalance: show the last figure
            return cached[2] if cached is not None else None
        predicted = predicted_imbalance(placement, snap.heat_window)
        self._predicted = (snap.tick, self.policy, predicted)
        return predicted

    def _plan_job(self, snap: Snapshot, layers: list[int] | None, policy: str, params: dict,
                  min_gain: float, fault: str | None = None) -> PlanJob:
        topo = {"num_devices": self.topo.num_devices, "slots_per_device": self.topo.slots_per_device,
                "num_nodes": self.topo.num_nodes, "num_groups": self.topo.num_groups}
        return PlanJob(policy, params, snap.heat_window, snap.placement, topo, layers, min_gain,
                       self.expert_bytes, fault)

    def rebalance(self, content: dict) -> dict:
        snap = self._require_snapshot()
        self._refuse_if_failed()
        dry_run = content.get("dry_run")
        if not isinstance(dry_run, bool):  # a request that forgot it must not start a real job
            raise RequestError(400, "dry_run is required: true to preview a plan, false to apply one")
        plan_id = str_field(content, "plan_id")
        if plan_id is not None:
            if dry_run:
                raise RequestError(422, "plan_id applies a previewed plan: send it with dry_run false")
            return self._apply_preview(plan_id)
        req = rebalance_fields(content, snap.placement.shape[0], self.policy, self.threshold, self.min_gain)
        if not dry_run:
            with self._lock:
                self._claim()
                snap = self._snapshot   # no job runs now: this placement is the one in force
        try:
            measured = measured_imbalance(snap.slot_window)
            layers = req.layers
            if layers is None:
                layers = [la for la in range(len(measured)) if measured[la] > req.threshold]
            fault = None if dry_run else self.faults.policy_fault()
            try:
                plan_job = self._plan_job(snap, layers, req.policy, req.params, req.min_gain, fault)
                placement, report = self.planner.plan(plan_job)
            except PolicyRefused as exc:
                raise RequestError(422, str(exc)) from None
            except PlannerError as exc:
                self.events.append(f"step {snap.step}: {exc}")
                raise RequestError(500, str(exc)) from None
            if dry_run:
                try:
                    self._check_staging(snap.placement, placement, report)
                except RequestError as exc:    # shown, but not kept: applying it could only be refused
                    return {"plan": {**report, "plan_id": None, "refused": exc.message}}
                return {"plan": {**report, "plan_id": self.plans.add(layers, snap.placement, placement, report)}}
            self._check_staging(snap.placement, placement, report)
            return {"job": self._queue_job(snap, layers, placement, {**report, "plan_id": None}, measured)}
        finally:
            if not dry_run:
                with self._lock:
                    self._planning = False

    def _claim(self) -> None:
        """Under the lock: one redeployment at a time, from its planning to its end."""
        active = self.book.active
        if active is not None or self._planning:
            raise RequestError(409, "a redeployment is already running" +
                               (f" (job {active})" if active is not None else " (planning)"))
        self._planning = True

    def _apply_preview(self, plan_id: str) -> dict:
        """Queue exactly the rows a dry run planned, if none of its layers changed since."""
        with self._lock:
            self._claim()
            snap = self._snapshot  # no job runs, so this placement is the one in force
        try:
            stored = self.plans.take(plan_id, snap.placement)
            placement = snap.placement.copy()
            placement[stored.layers] = stored.rows
            self._check_staging(snap.placement, placement, stored.report)
            return {"job": self._queue_job(snap, stored.layers, placement, stored.report,
                                           measured_imbalance(snap.slot_window))}
        finally:
            with self._lock:
                self._planning = False

    def _check_staging(self, current: np.ndarray, placement: np.ndarray, report: dict) -> None:
        """Refuse, before anything moves, a layer that needs more staging slots than a rank has."""
        for row in report["layers"]:
            if not row["change"]:
                continue
            la = row["layer"]
            need = (current[la] != placement[la]).sum(axis=1)            # [N] slots each rank rewrites
            if need.max() > self.staging_slots:
                rank = int(need.argmax())
                raise RequestError(422, f"layer {la} would rewrite {int(need.max())} slots on rank {rank}, more than "
                                        f"its {self.staging_slots} staging slots; raise --staging-slots or use a "
                                        "policy that moves fewer experts (swift)")

    def _queue_job(self, snap: Snapshot, layers: list[int], placement: np.ndarray, report: dict,
                   measured: np.ndarray) -> dict:
        with self._lock:
            job = self.book.open(layers, report, measured, self._gather_s)
            if job["layers"]:
                self._commands.append({"op": "redeploy", "job_id": job["job_id"], "layers": job["layers"],
                                       "rows": placement[job["layers"]].reshape(-1).tolist()})
            return dict(job)

    def job(self, content: dict) -> dict:
        job_id = content.get("job_id")
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise RequestError(400, "job_id must be an integer")
        with self._lock:
            job = self.book.jobs.get(job_id)
            if job is None:
                raise RequestError(422, f"no job {job_id}")
            return {"job": dict(job)}

    def profile(self, content: dict) -> dict:
        last = content.get("last", 10)
        if not isinstance(last, int) or isinstance(last, bool) or last < 1:
            raise RequestError(400, "last must be a positive integer")
        with self._lock:
            records = list(self.book.records)[-last:]
        return {"records": records, "memory": dict(self.memory), "events": list(self.events)}

    def _refuse_if_failed(self) -> None:
        # 503 as the protocol says, flagged so that a client does not take a dead deployment for a busy one
        if self.fault:
            raise RequestError(503, f"the deployment has failed: {self.fault}", {"deployment_failed": True})

    def _run_probe(self, timeout_s: float = 60.0) -> dict:
        self._refuse_if_failed()
        request_id = next(self._request_ids)
        event = threading.Event()
        with self._lock:
            self._probe_waiters[request_id] = event
            self._commands.append({"op": "verify", "request_id": request_id})
        if not event.wait(timeout_s):
            raise RequestError(503, f"the deployment did not run the check within {timeout_s:g}s")
        with self._lock:
            return dict(self._probe)

    def verify(self, content: dict) -> dict:
        probe = self._run_probe()
        return {"baseline": probe["baseline"], "current": probe["current"], "step": probe["step"],
                "weights_ok": probe.get("weights_ok", False),
                "ok": probe["baseline"] == probe["current"] and probe.get("weights_ok", False)}

    def inspect(self, content: dict) -> dict:
        snap = self._require_snapshot()
        layer = content.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < snap.placement.shape[0]:
            raise RequestError(422, f"layer must be an integer in 0-{snap.placement.shape[0] - 1}")
        probe = self._run_probe()
        return {"layer": layer, "step": probe["step"], "phy2log": snap.placement[layer].tolist(),
                "checksums": probe["sums"][layer].tolist()}

    def request_shutdown(self, content: dict) -> dict:
        with self._lock:
            self._commands.append({"op": "shutdown"})
        self.shutdown.set()
        return {}


def _replicas(placement: np.ndarray, num_experts: int) -> np.ndarray:
    from eplbctl.placement import replica_counts
    return replica_counts(placement, num_experts)
