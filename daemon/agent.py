"""The per-rank EPLB agent: the one owner of this rank's EPLB state, advanced once per step.

Glossary: a *tick* is the control point every `tick_every` steps (and after every commit) where the
ranks all-gather their new per-slot counts on the small control group and the coordinator (rank 0)
broadcasts the next command. A *job* redeploys chosen layers, `layers_per_step` at a time: transfers
are launched before a forward step, waited after it, verified, voted on, then committed in place.
Every rank applies the same command at the same step, so placements never diverge.

The worker drives it as a generator (one `yield` per forward step)::

    for step in agent.steps():
        model.forward(step, agent.recorder)
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
import torch.distributed as dist
from eplbd.aggregator import gather_rows
from eplbd.faults import Faults
from eplbd.moe import Maps, SimMoE, digest
from eplbd.profiler import ERR_CODES, STAT_FIELDS
from eplbd.recorder import SlotRecorder
from eplbd.staging import batch_checksums
from eplbd.transfer import CapacityError, StagedLayer, TransferEngine

from eplbctl.placement import log2phy, replica_counts

log = logging.getLogger("eplbd.agent")

PROBE_STEP = -1


@dataclass
class AgentConfig:
    tick_every: int = 10
    layers_per_step: int = 1
    max_ops: int = 64
    staging_slots: int | None = None   # default: one layer's local experts
    comm_timeout_s: float = 30.0


@dataclass
class Job:
    job_id: int
    pending: list[int]
    rows: dict[int, np.ndarray]        # layer -> new [N, S]


def build_maps(placement: np.ndarray, num_experts: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """placement [L, N, S] -> (log2phy [L, E, width], logcnt [L, E])."""
    return log2phy(placement, num_experts, width), replica_counts(placement, num_experts)


class Agent:
    def __init__(self, model: SimMoE, placement: np.ndarray, rank: int, world: int,
                 ctrl_group: dist.ProcessGroup, xfer_group: dist.ProcessGroup, config: AgentConfig,
                 coordinator: object | None = None, faults: Faults | None = None) -> None:
        self.model = model
        self.shape = model.shape
        self.placement = placement.copy()                 # CPU mirror of the maps, [L, N, S]
        self.rank, self.world = rank, world
        self.ctrl, self.xfer = ctrl_group, xfer_group
        self.config = config
        self.coord = coordinator                          # eplbd.control.Control on rank 0
        self.faults = faults or Faults([])
        shape = self.shape
        self.recorder = SlotRecorder(shape.num_layers, shape.slots,
                                     world * shape.tokens * shape.top_k, torch.device("cpu"))
        self.expert_sums, slot_sums = self._gather_expert_sums()
        capacity = config.staging_slots or shape.slots
        self.engine = TransferEngine(model.store.tensors, rank, xfer_group, capacity, config.max_ops,
                                     config.comm_timeout_s, self.expert_sums, slot_sums)
        self.step = 0
        self.steps_since_tick = 0
        self.stopping = False
        self.job: Job | None = None
        self.inflight: list[StagedLayer] = []
        self.step_times: deque[float] = deque(maxlen=32)

    # ---- start-up -------------------------------------------------------------------------

    def _live_checksums(self) -> torch.Tensor:
        # one call per layer and tensor: small enough temporaries to stay in cache (10x faster than one call)
        tensors = self.model.store.tensors
        return torch.stack([torch.stack([batch_checksums(t[la]) for t in tensors], dim=1)
                            for la in range(self.shape.num_layers)])                              # [L, S, T]

    def _gather_all_checksums(self) -> torch.Tensor:
        """-> [L, N, S, T] checksums of every live slot of every rank."""
        local = self._live_checksums()                                     # [L, S, T]
        rows = gather_rows(local.reshape(-1), self.world, self.ctrl)       # [N, L*S*T]
        return rows.view(self.world, *local.shape).permute(1, 0, 2, 3)

    def _gather_expert_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the checksum each logical expert's tensors must have [L, E, T], this rank's slots [L, S, T]).

        Replicas must agree: a start-up canary for weights loaded wrong."""
        sums = self._gather_all_checksums()
        L, N, S, T = sums.shape
        table = torch.zeros(L, self.shape.num_experts, T, dtype=torch.int64)
        seen = np.zeros((L, self.shape.num_experts), dtype=bool)
        for la in range(L):
            for n in range(N):
                for s in range(S):
                    e = int(self.placement[la, n, s])
                    if seen[la, e] and not torch.equal(table[la, e], sums[la, n, s]):
                        raise RuntimeError(f"layer {la}: replicas of expert {e} differ at start-up")
                    table[la, e] = sums[la, n, s]
                    seen[la, e] = True
        return table, sums[:, self.rank].clone()

    def _warmup(self) -> None:
        """Touch staging buffers and open the P2P links once, so the first real move is not the slow one."""
        self.engine.warm_up(self.world)

    # ---- the step loop ----------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        self._warmup()
        self._probe(publish_baseline=True)
        while not self.stopping:
            start = time.perf_counter()
            self._before_forward()
            yield self.step
            self._after_forward(start)
            self.step += 1

    def _before_forward(self) -> None:
        if self.job is None or self.inflight or not self.job.pending:
            return
        first_row = 0      # layers in flight share the staging buffer, each in its own rows
        for _ in range(min(self.config.layers_per_step, len(self.job.pending))):
            layer = self.job.pending[0]
            try:
                staged = self.engine.prepare(layer, self.placement[layer], self.job.rows[layer], first_row)
            except Exception as exc:
                if isinstance(exc, CapacityError) and self.inflight:
                    break      # the rows left this step are too few: the layer goes first next step
                self.job.pending.pop(0)
                staged = StagedLayer(layer, [], [])
                staged.fail(exc)
                self.inflight.append(staged)
                continue
            self.job.pending.pop(0)
            first_row += staged.rows_used
            self.faults.before_launch(self.rank, layer, staged)
            self.engine.launch(staged)
            self.inflight.append(staged)
            self.faults.after_launch(self.rank, layer, staged.posted)

    def _after_forward(self, start: float) -> None:
        self.steps_since_tick += 1
        if self.inflight:
            self._finish_layers(start)
        else:
            self.step_times.append(time.perf_counter() - start)
            if self.steps_since_tick >= self.config.tick_every:
                self._tick(self.placement, self._stats([], start, time.perf_counter()))

    def _finish_layers(self, start: float) -> None:
        staged = self.inflight
        self.inflight = []
        ok = [s.error is None and self.engine.wait(s) for s in staged]
        # one vote per layer in flight (a layer commits everywhere or nowhere, whatever its siblings
        # do), and one on whether every rank's engine can still move experts (see TransferEngine._break)
        votes = torch.tensor([int(x) for x in ok] + [int(self.engine.broken is None)], dtype=torch.int64)
        dist.all_reduce(votes, op=dist.ReduceOp.MIN, group=self.ctrl)
        *layer_votes, healthy = votes.tolist()
        before = self.placement.copy()
        for s, vote in zip(staged, layer_votes, strict=True):
            if vote:
                self.engine.commit(s)
                self._commit_maps(s.layer, self.job.rows[s.layer])
            elif s.error:
                log.error("rank %d: %s", self.rank, s.error)
        if not all(layer_votes):
            self.job.pending = []       # the job ends at its first aborted layer
        finished = time.perf_counter()
        self._tick(before, self._stats(staged, start, finished))
        if not healthy:
            # every rank stops here, together: a late P2P write could corrupt a later layer unseen
            raise RuntimeError("expert transfers stopped after a failed transfer ("
                               f"{self.engine.broken or 'on another rank'}); restart eplbd to rebalance again")
        if not self.job.pending:
            self.job = None
            self._probe(publish_baseline=False)

    def _commit_maps(self, layer: int, row: np.ndarray) -> None:
        self.placement[layer] = row
        table, counts = build_maps(self.placement[layer:layer + 1], self.shape.num_experts,
                                   self.model.maps.log2phy.shape[2])
        self.model.maps.log2phy[layer].copy_(torch.from_numpy(table[0]))  # in place: graphs stay valid
        self.model.maps.logcnt[layer].copy_(torch.from_numpy(counts[0]))

    def _stats(self, staged: list[StagedLayer], start: float, end: float) -> torch.Tensor:
        rows = torch.full((self.config.layers_per_step, STAT_FIELDS), -1, dtype=torch.int64)
        for i, s in enumerate(staged):
            err = 0 if s.error is None else ERR_CODES.get(s.error_kind or "transfer", ERR_CODES["transfer"])
            transfer_ns = int(s.transfer_s * 1e9) * (1 if s.transfer_exact else -1)  # < 0: an upper bound
            rows[i] = torch.tensor([s.layer, s.bytes_recv, s.bytes_sent, transfer_ns,
                                    int(s.commit_s * 1e9), int(s.plan_s * 1e9), int(s.error is None), err,
                                    int(s.verify_s * 1e9)])
        base = statistics.median(self.step_times) if self.step_times else 0.0
        tail = torch.tensor([int((end - start) * 1e9), int(base * 1e9)], dtype=torch.int64)
        return torch.cat([rows.reshape(-1), tail])

    # ---- ticks and commands -------------------------------------------------------------------

    def _tick(self, placement_in_force: np.ndarray, stats: torch.Tensor) -> None:
        shape = self.shape
        started = time.perf_counter()
        counts = self.recorder.drain()
        rows = gather_rows(torch.cat([counts.reshape(-1), stats]), self.world, self.ctrl)
        if self.coord is not None:
            n_counts = shape.num_layers * shape.slots
            slot_counts = rows[:, :n_counts].reshape(self.world, shape.num_layers, shape.slots)
            slot_counts = slot_counts.permute(1, 0, 2).numpy()           # [N, L, S] -> [L, N, S]
            self.coord.on_tick(self.step, self.steps_since_tick, slot_counts, placement_in_force,
                               self.placement, rows[:, n_counts:].numpy(), time.perf_counter() - started,
                               self.job.job_id if self.job else None)
        self.steps_since_tick = 0
        self._apply(self._broadcast_command())

    def _broadcast_command(self) -> dict | None:
        blob = b""
        if self.coord is not None:
            cmd = self.coord.next_command()
            blob = msgpack.packb(cmd) if cmd is not None else b""
        size = torch.tensor([len(blob)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.ctrl)
        if size.item() == 0:
            return None
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if self.coord is not None \
            else torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.ctrl)
        return msgpack.unpackb(data.numpy().tobytes())

    def _apply(self, cmd: dict | None) -> None:
        if cmd is None:
            return
        op = cmd["op"]
        if op == "redeploy":
            _, N, S = self.placement.shape
            rows = np.asarray(cmd["rows"], dtype=np.int64).reshape(len(cmd["layers"]), N, S)
            self.job = Job(cmd["job_id"], list(cmd["layers"]), dict(zip(cmd["layers"], rows, strict=True)))
            if self.coord is not None:
                self.coord.on_job_started(cmd["job_id"], self.step)
        elif op == "verify":
            self._probe(publish_baseline=False, request_id=cmd.get("request_id"))
        elif op == "shutdown":
            self.stopping = True

    def _probe(self, publish_baseline: bool, request_id: int | None = None) -> None:
        """Run the fixed probe batch through every layer; the coordinator compares digests."""
        out = self.model.forward(PROBE_STEP, self.recorder, probe=True)
        mine = np.frombuffer(bytes.fromhex(digest(out)), dtype=np.uint8).astype(np.int64)
        rows = gather_rows(torch.from_numpy(mine), self.world, self.ctrl)
        sums = self._gather_all_checksums()
        if self.coord is not None:
            combined = hashlib.sha256(rows.numpy().astype(np.uint8).tobytes()).hexdigest()
            self.coord.on_probe(self.step, combined, publish_baseline, sums.numpy(), self.expert_sums.numpy(),
                                request_id)
        if os.environ.get("EPLBD_DEBUG"):
            log.info("rank %d probe at step %d", self.rank, self.step)


def initial_maps(placement: np.ndarray, num_experts: int, width: int) -> Maps:
    table, counts = build_maps(placement, num_experts, width)
    return Maps(torch.from_numpy(table).clone(), torch.from_numpy(counts).clone())
