"""Redeployment of one layer: executing its transfer plan (``transfer_plan.py``) on this rank.

Phases of a layer, in order:  PLANNED -> STAGING -> STAGED (verified) -> voted -> COMMITTED | ABORTED.
Receives land in a reusable staging buffer while the live weights keep serving; nothing live changes
before every rank has voted that its staged tensors verified. Sends read live slots (untouched until
the commit) or staging rows that nothing overwrites before the send is done.

Staging (``staging.py``) is one byte buffer whose rows each hold one expert's tensors and checksums,
so the experts one sender ships to one peer in a batch travel as a single message.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from eplbd.staging import Staging, batch_checksums
from eplbd.streams import SideStream
from eplbd.transfer_plan import Batch, Move, Schedule, one_batch_rows, plan_layer, schedule


class Phase(enum.Enum):
    PLANNED = "planned"
    STAGING = "staging"
    STAGED = "staged"
    COMMITTED = "committed"
    ABORTED = "aborted"


class TransferError(RuntimeError):
    """A layer could not be staged: a peer died or timed out, or a tensor failed verification."""

    kind = "transfer"


class CapacityError(TransferError):
    """A layer needs more staging rows on this rank than its buffer has; refused before anything moves."""

    kind = "capacity"


class VerifyError(TransferError):
    """What arrived does not hash to the expert it should be (corrupted in flight, or a wrong slot)."""

    kind = "verify"


class TimeoutError_(TransferError):
    """A peer did not complete its part of a batch within the time limit (dead or hung)."""

    kind = "timeout"


def _on_done(work: dist.Work, stamps: list[float]) -> bool:
    """Record when a P2P op completes (a callback on its future); False where the backend has none."""
    try:
        work.get_future().add_done_callback(lambda _: stamps.append(time.perf_counter()))
    except (RuntimeError, AttributeError):
        return False
    return True


@dataclass
class StagedLayer:
    layer: int
    moves: list[Move]                       # the whole layer's plan (same on every rank)
    incoming: list[Move]                    # moves whose destination is this rank, in staging order
    phase: Phase = Phase.PLANNED
    bytes_recv: int = 0
    bytes_sent: int = 0
    plan_s: float = 0.0
    started: float = 0.0
    transfer_s: float = 0.0                 # launch -> every byte arrived (see transfer_exact)
    verify_s: float = 0.0
    commit_s: float = 0.0
    error: str | None = None
    error_kind: str | None = None           # "transfer" | "timeout" | "verify" | "capacity"
    batches: int = 0                        # P2P batches the layer needs (each posted after the last one's sends)
    schedule: Schedule | None = None        # batches and staging rows, the same on every rank
    first_row: int = 0                      # this layer's rows start here (layers in flight share staging)
    rows_used: int = 0                      # rows it occupies on the busiest rank (the same on every rank)
    _pending: list = field(default_factory=list)   # [(batch number, Batch)] still to post
    _sends: list = field(default_factory=list)     # this rank's send works of the batch in flight
    _recvs: list = field(default_factory=list)     # every receive work posted so far
    _done: list = field(default_factory=list)      # completion times of the P2P works (when known)
    _where: dict = field(default_factory=dict)     # move index -> this rank's staging row
    corrupt: bool = False                          # fault injection: flip one received value before verify
    posted: threading.Event = field(default_factory=threading.Event)     # its first batch is out
    _finished: threading.Event = field(default_factory=threading.Event)  # staged and verified, or failed

    def fail(self, exc: BaseException) -> None:
        """Record why the layer did not stage (its first line) and abort it."""
        self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.error_kind = getattr(exc, "kind", "transfer")
        self.phase = Phase.ABORTED

    @property
    def transfer_exact(self) -> bool:
        """False when P2P ran but no completion was seen (the layer failed): transfer_s then runs to
        the failure, an upper bound."""
        return bool(self._done) or not (self.bytes_recv or self.bytes_sent)


# Tags: per-expert fallback messages use move index * 8 + part; packed runs live above them.
PACK_TAG = 1 << 22


class TransferEngine:
    """Moves expert weights of one layer at a time between ranks over a dedicated process group.

    A layer's remote moves go in batches; each is one `batch_isend_irecv` holding both its sends and
    its receives (so no rank's queue can hold a receive whose send sits behind it, which would
    deadlock NCCL/HCCL streams), posted once this rank's sends of the last one are done. A sender packs
    its experts for one peer into staging rows no receive is using yet, rows carrying the checksums it
    computed when the slots were written, and ships them as one message; the receiver checks what
    arrived against them and against the expert's known checksum, so corruption in flight and a wrong
    slot are both caught.
    """

    def __init__(self, tensors: list[torch.Tensor], rank: int, group: dist.ProcessGroup,
                 capacity: int, max_ops: int, timeout_s: float, expert_sums: torch.Tensor,
                 slot_sums: torch.Tensor, threaded: bool | None = None) -> None:
        self.tensors = tensors                # each [L, S, ...]: every per-expert tensor
        # a transfer thread on CPU/gloo only (see launch); None: decided by the device
        self.threaded = tensors[0].device.type == "cpu" if threaded is None else threaded
        self.rank = rank
        self.group = group
        self.capacity = capacity
        self.max_ops = max(1, max_ops)
        self.timeout = timedelta(seconds=timeout_s)
        self.expert_sums = expert_sums        # [L, E, T] int64: what each expert's tensors must hash to
        self.slot_sums = slot_sums            # [L, S, T] int64: checksums of this rank's live slots
        self.buf = Staging(tensors, capacity)
        self.side = SideStream(tensors[0].device)
        self.expert_bytes = sum(t[0, 0].numel() * t.element_size() for t in tensors)
        self._stamps: bool | None = None      # whether P2P works give completion times (unknown yet)
        self.broken: str | None = None        # why transfers stopped for good (see _break)
        self._queue: queue.SimpleQueue[StagedLayer] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    @property
    def staging_bytes(self) -> int:
        return self.buf.nbytes

    def warm_up(self, world: int) -> None:
        """Touch every staging page and exchange half a buffer with every peer, so the first real
        layer does not pay for page faults and lazily opened links."""
        self.buf.flat.zero_()
        half = self.capacity // 2
        if world > 1 and half:
            for shift in range(1, world):
                ops = [dist.P2POp(dist.isend, self.buf.flat[:half], (self.rank + shift) % world, self.group),
                       dist.P2POp(dist.irecv, self.buf.flat[half:2 * half], (self.rank - shift) % world,
                                  self.group)]
                for work in dist.batch_isend_irecv(ops):
                    work.wait(self.timeout)
        self.buf.flat.zero_()

    def prepare(self, layer: int, old: np.ndarray, new: np.ndarray, first_row: int = 0) -> StagedLayer:
        """Plan one layer into staging rows [first_row, capacity); CapacityError when they are too few.

        Layers in flight at once take consecutive row ranges (`rows_used` each), so none overwrites
        another's rows; `first_row` must be the same on every rank, as it shapes the schedule."""
        if self.broken:
            raise TransferError(f"layer {layer}: expert transfers stopped after a failed transfer ({self.broken}); "
                                "restart eplbd to move experts again")
        start = time.perf_counter()
        moves = plan_layer(old, new)
        # no more rows than one batch needs, so the rest is left to other layers in flight
        rows_left = min(self.capacity - first_row, one_batch_rows(moves, old.shape[0]))
        try:
            plan = schedule(moves, old.shape[0], rows_left, self.max_ops, len(self.tensors) + 1)
        except ValueError as exc:
            raise CapacityError(f"layer {layer}: {exc}" + (f" after row {first_row}" if first_row else "")) from None
        rows = plan.rows[self.rank]
        staged = StagedLayer(layer, moves, [moves[i] for i in rows], schedule=plan, first_row=first_row)
        staged.rows_used = max(max(len(r), end) for r, end in zip(plan.rows, plan.send_end, strict=True))
        staged._where = {index: first_row + row for row, index in enumerate(rows)}
        staged._pending = list(enumerate(plan.batches))
        staged.batches = len(plan.batches)
        staged.plan_s = time.perf_counter() - start
        return staged

    def launch(self, staged: StagedLayer) -> None:
        """Start the layer's transfer and return; `wait` returns once it is staged and verified.

        On CPU (gloo) one transfer thread runs the layers in launch order: it posts a batch as soon as
        the rows it reuses are free and verifies on arrival while the worker's forward step runs, so
        neither the later batches (gloo cannot post them from a completion callback) nor verification
        sits in the step's stall. Gloo groups are independent sockets, so the thread's P2P and the
        forward's collectives may interleave differently on different ranks. NCCL/HCCL communicators
        may not (concurrent communicators issued in different orders can deadlock), so on a device the
        first batch is posted here, before the forward, and the rest in `wait`, after it: the same
        order on every rank, with the work itself on the side stream."""
        staged.phase = Phase.STAGING
        if not self.threaded:
            self._start(staged)
            return
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, daemon=True, name="eplb-transfer")
            self._worker.start()
        self._queue.put(staged)

    def _serve(self) -> None:
        self.side.bind_thread()
        while True:
            staged = self._queue.get()
            try:
                if self._start(staged):
                    self._finish(staged)
            finally:
                staged.posted.set()
                staged._finished.set()

    def _start(self, staged: StagedLayer) -> bool:
        """Post the first batch (and copy the local moves when no packed send needs their rows)."""
        staged.started = time.perf_counter()
        try:
            with self.side.active():
                self._next_batch(staged)
                if self._locals_first(staged):
                    self._fill_locals(staged)        # copied while the batch flies
            return True
        except Exception as exc:   # anything: a dead transfer thread would stall every later layer
            self._fail(staged, exc)
            return False
        finally:
            staged.posted.set()

    def _finish(self, staged: StagedLayer) -> None:
        """Post the later batches, wait for every byte, verify."""
        try:
            with self.side.active():
                self._finish_batches(staged)
                if not staged._done:
                    staged._done.append(time.perf_counter())   # seen by a waiter that does nothing else
                staged.transfer_s = max(staged._done) - staged.started
                if staged.corrupt and staged.incoming:
                    self.buf.views[0][staged.first_row].view(-1)[0] += 1
                verify_start = time.perf_counter()
                self._verify(staged)
                staged.verify_s = time.perf_counter() - verify_start
            staged.phase = Phase.STAGED
        except Exception as exc:
            self._fail(staged, exc)

    def _locals_first(self, staged: StagedLayer) -> bool:
        """Whether the local copies go in at launch: no packed send of this rank uses their rows."""
        return staged.schedule.send_end[self.rank] <= staged.schedule.local_row[self.rank]

    def _fill_locals(self, staged: StagedLayer) -> None:
        local_row = staged.schedule.local_row[self.rank]
        local = staged.incoming[local_row:]
        if local:
            slots = self._index([m.src_slot for m in local])
            first = staged.first_row + local_row
            self.buf.fill(slice(first, first + len(local)), self.tensors, staged.layer, slots,
                          self.slot_sums[staged.layer, slots])

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.buf.flat.device)

    def _batch_ops(self, staged: StagedLayer, number: int, batch: Batch) -> tuple[list, int]:
        """-> (this rank's receives then sends of one batch, number of receives)."""
        to_peer: dict[int, list[tuple[int, Move]]] = {}
        from_peer: dict[int, list[int]] = {}
        for index, m in batch.moves:
            if m.src_rank == self.rank:
                to_peer.setdefault(m.dst_rank, []).append((index, m))
            elif m.dst_rank == self.rank:
                from_peer.setdefault(m.src_rank, []).append(index)
        layer, ops, buf, tag = staged.layer, [], self.buf, PACK_TAG + number
        for peer in sorted(from_peer):
            rows = [staged._where[index] for index in from_peer[peer]]   # one contiguous run per peer
            if batch.packed:
                ops.append(dist.P2POp(dist.irecv, buf.flat[rows[0]:rows[-1] + 1], peer, self.group, tag))
            else:
                for index, i in zip(from_peer[peer], rows, strict=True):
                    parts = [v[i] for v in buf.views] + [buf.sums[i]]
                    ops += [dist.P2POp(dist.irecv, p, peer, self.group, index * 8 + k) for k, p in enumerate(parts)]
            staged.bytes_recv += len(rows) * self.expert_bytes
        n_recvs = len(ops)
        row = staged.first_row + batch.send_row[self.rank]
        for peer in sorted(to_peer):
            moves = to_peer[peer]
            slots = self._index([m.src_slot for _, m in moves])
            if batch.packed:
                rows = slice(row, row + len(moves))
                buf.fill(rows, self.tensors, layer, slots, self.slot_sums[layer, slots])
                ops.append(dist.P2POp(dist.isend, buf.flat[rows], peer, self.group, tag))
                row += len(moves)
            else:
                for index, m in moves:
                    parts = [t[layer, m.src_slot] for t in self.tensors] + [self.slot_sums[layer, m.src_slot]]
                    ops += [dist.P2POp(dist.isend, p, peer, self.group, index * 8 + k) for k, p in enumerate(parts)]
            staged.bytes_sent += len(moves) * self.expert_bytes
        return ops, n_recvs

    def _next_batch(self, staged: StagedLayer) -> None:
        staged._sends = []
        if not staged._pending:
            return
        number, batch = staged._pending.pop(0)
        ops, n_recvs = self._batch_ops(staged, number, batch)
        works = dist.batch_isend_irecv(ops) if ops else []
        # asked once: gloo raises for every work, which costs more per layer than the packing
        for work in works if self._stamps is not False else []:
            self._stamps = _on_done(work, staged._done)
            if not self._stamps:
                break
        staged._recvs += works[:n_recvs]
        staged._sends = works[n_recvs:]

    def _wait_for(self, staged: StagedLayer, works: list) -> None:
        for work in works:
            if not work.wait(self.timeout):
                raise TimeoutError_(f"layer {staged.layer}: a transfer did not finish within "
                                    f"{self.timeout.total_seconds():.0f}s")

    def wait(self, staged: StagedLayer) -> bool:
        """The layer's transfer and verification, finished; False (with `error`) instead of raising."""
        if not self.threaded:
            if staged.phase is Phase.STAGING:
                self._finish(staged)
            return staged.phase is Phase.STAGED
        # the thread's own waits are bounded; this bound only guards against a call that never returns
        if not staged._finished.wait(self.timeout.total_seconds() * (staged.batches + 2) + 30):
            # given up: the thread may still finish this layer, but the vote has its "no" already
            staged.fail(TimeoutError_(f"layer {staged.layer}: the transfer thread did not finish"))
            self._break(staged)
            return False
        return staged.phase is Phase.STAGED

    def _fail(self, staged: StagedLayer, exc: BaseException) -> None:
        staged.transfer_s = time.perf_counter() - staged.started
        staged.fail(exc)
        if staged.error_kind in ("transfer", "timeout"):
            self._break(staged)

    def _break(self, staged: StagedLayer) -> None:
        """After a P2P timeout or error, ops of that layer may still be posted (gloo closed the pair;
        a peer may send late into its staging rows), so this engine moves nothing more: a late write
        landing between a later layer's verify and commit would go unseen."""
        self.broken = self.broken or f"layer {staged.layer}: {staged.error}"

    def _finish_batches(self, staged: StagedLayer) -> None:
        """The next batch's receives and packed sends reuse only rows this rank's own sends read, so it
        goes out as soon as those sends are done; receives (distinct rows) are waited once, at the end."""
        self._wait_for(staged, staged._sends)
        while staged._pending:
            self._next_batch(staged)
            self._wait_for(staged, staged._sends)
        if not self._locals_first(staged):
            self._fill_locals(staged)
        self._wait_for(staged, staged._recvs)
        staged._sends, staged._recvs = [], []

    def _verify(self, staged: StagedLayer) -> None:
        n = len(staged.incoming)
        if n == 0:
            return
        want = self.expert_sums[staged.layer][[m.expert for m in staged.incoming]]           # [n, T]
        rows = slice(staged.first_row, staged.first_row + n)
        got = torch.stack([batch_checksums(v[rows]) for v in self.buf.views], dim=1)           # [n, T]
        sent_bad = (self.buf.sums[rows] != want).any(dim=1)
        got_bad = (got != want).any(dim=1)
        if bool(sent_bad.any()):
            m = staged.incoming[int(sent_bad.nonzero()[0])]
            raise VerifyError(f"layer {staged.layer}: rank {m.src_rank} sent expert {m.expert} from slot "
                                f"{m.src_slot} whose checksum does not match the expert's (wrong slot?)")
        if bool(got_bad.any()):
            m = staged.incoming[int(got_bad.nonzero()[0])]
            raise VerifyError(f"layer {staged.layer}: expert {m.expert} arrived corrupted on rank "
                                f"{self.rank} slot {m.dst_slot} (checksum mismatch)")

    def commit(self, staged: StagedLayer) -> None:
        """Copy verified staging rows into their live slots (in place, tensors never reallocated)."""
        start = time.perf_counter()
        n = len(staged.incoming)
        if n:
            self.side.after_forward()          # the forward that read the old weights is done first
            with self.side.active():
                dst = self._index([m.dst_slot for m in staged.incoming])
                rows = slice(staged.first_row, staged.first_row + n)
                for view, t in zip(self.buf.views, self.tensors, strict=True):
                    t[staged.layer].index_copy_(0, dst, view[rows])
                self.slot_sums[staged.layer].index_copy_(0, dst, self.buf.sums[rows])
            self.side.before_forward()         # the next forward reads only committed weights
        staged.phase = Phase.COMMITTED
        staged.commit_s = time.perf_counter() - start
