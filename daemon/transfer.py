"""Redeployment of one layer: the transfer plan (data, identical on every rank) and its execution.

Phases of a layer, in order:  PLANNED -> STAGING -> STAGED (verified) -> voted -> COMMITTED | ABORTED.
Receives land in a reusable staging buffer while the live weights keep serving; nothing live changes
before every rank has voted that its staged tensors verified. Sends read live slots, which stay
untouched until the commit, so no staging row is ever read and overwritten at once.

Staging (``staging.py``) is one byte buffer whose rows each hold one expert's tensors and checksums,
so the experts one sender ships to one peer in a batch travel as a single message.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from eplbd.staging import Staging, batch_checksums
from eplbd.streams import SideStream


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


@dataclass(frozen=True)
class Move:
    """Expert `expert` goes into (dst_rank, dst_slot), copied from (src_rank, src_slot)."""
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank


def _on_done(work: dist.Work, stamps: list[float]) -> None:
    """Record when a P2P op completes (a callback on its future, where the backend provides one)."""
    try:
        work.get_future().add_done_callback(lambda _: stamps.append(time.perf_counter()))
    except (RuntimeError, AttributeError):
        pass


def plan_layer(old: np.ndarray, new: np.ndarray) -> list[Move]:
    """old, new [N, S] -> every slot whose expert changes, sorted by (expert, dst rank, dst slot).

    A device that already holds the expert copies it locally; otherwise the sender is the holder
    with the fewest sends so far (lowest rank on ties), so the plan is the same on every rank.
    """
    old = np.asarray(old)
    new = np.asarray(new)
    if old.shape != new.shape:
        raise ValueError(f"placements differ in shape: {old.shape} vs {new.shape}")
    num_ranks = old.shape[0]
    holders: dict[int, list[tuple[int, int]]] = {}
    for rank in range(num_ranks):
        for slot, expert in enumerate(old[rank].tolist()):
            holders.setdefault(expert, []).append((rank, slot))
    changed = [(int(new[n, s]), n, s) for n, s in zip(*np.nonzero(old != new), strict=True)]
    sends = [0] * num_ranks
    moves = []
    for expert, rank, slot in sorted(changed):
        own = [h for h in holders.get(expert, []) if h[0] == rank]
        if own:
            src = own[0]
        else:
            candidates = holders.get(expert)
            if not candidates:
                raise ValueError(f"expert {expert} is held by no device before the move")
            src = min(candidates, key=lambda h: (sends[h[0]], h[0], h[1]))
            sends[src[0]] += 1
        moves.append(Move(expert, src[0], src[1], rank, slot))
    return moves


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
    batches: int = 0                        # P2P batches the layer needs (each waited before the next)
    n_in: list[int] = field(default_factory=list)  # staging rows each rank needs for this layer
    _chunks: list = field(default_factory=list)    # [(chunk number, [(move index, move)])] still to run
    _sends: list = field(default_factory=list)     # this rank's send works of the chunk in flight
    _recvs: list = field(default_factory=list)     # every receive work posted so far
    _done: list = field(default_factory=list)      # completion times of the P2P works (when known)

    @property
    def transfer_exact(self) -> bool:
        """False when P2P ran but the backend gave no completion time (gloo): transfer_s then runs to
        our wait after the forward step, an upper bound."""
        return bool(self._done) or not (self.bytes_recv or self.bytes_sent)


# Tags: per-expert fallback messages use move index * 8 + part; packed runs live above them.
PACK_TAG = 1 << 22


class TransferEngine:
    """Moves expert weights of one layer at a time between ranks over a dedicated process group.

    A layer's remote moves go in chunks; each chunk is one `batch_isend_irecv` holding both its sends
    and its receives (so no rank's queue can hold a receive whose send sits behind it, which would
    deadlock NCCL/HCCL streams), waited before the next one. A sender packs its experts for one peer
    into the free tail of its staging buffer, rows carrying the checksums it computed when the slots
    were written, and ships them as one message; the receiver checks what arrived against them and
    against the expert's known checksum, so corruption in flight and a wrong slot are both caught.
    """

    def __init__(self, tensors: list[torch.Tensor], rank: int, group: dist.ProcessGroup,
                 capacity: int, max_ops: int, timeout_s: float, expert_sums: torch.Tensor,
                 slot_sums: torch.Tensor) -> None:
        self.tensors = tensors                # each [L, S, ...]: every per-expert tensor
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
        self.corrupt_next = False             # fault injection: flip one staged value before verify

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

    def prepare(self, layer: int, old: np.ndarray, new: np.ndarray) -> StagedLayer:
        start = time.perf_counter()
        moves = plan_layer(old, new)
        # staging order: local copies first, then by source rank, so each peer's data is one run
        incoming = sorted((m for m in moves if m.dst_rank == self.rank),
                          key=lambda m: (not m.local, m.src_rank, m.expert))
        staged = StagedLayer(layer, moves, incoming)
        staged.n_in = [0] * old.shape[0]
        for m in moves:
            staged.n_in[m.dst_rank] += 1
        if len(incoming) > self.capacity:
            raise CapacityError(f"layer {layer} needs {len(incoming)} staging slots on rank {self.rank}, "
                                f"capacity is {self.capacity}")
        staged._chunks = list(enumerate(self._chunks(moves, staged.n_in)))
        staged.batches = len(staged._chunks)
        staged.plan_s = time.perf_counter() - start
        return staged

    def launch(self, staged: StagedLayer) -> None:
        """Stage the local copies and start the first chunk; returns without waiting."""
        staged.started = time.perf_counter()
        staged.phase = Phase.STAGING
        self._where = {m: i for i, m in enumerate(staged.incoming)}
        with self.side.active():
            self._next_chunk(staged)
            local = [m for m in staged.incoming if m.local]  # first in staging order; copied while the chunk flies
            if local:
                slots = self._index([m.src_slot for m in local])
                self.buf.fill(slice(0, len(local)), self.tensors, staged.layer, slots,
                              self.slot_sums[staged.layer, slots])

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.buf.flat.device)

    def _packs(self, staged: StagedLayer, rank: int, outgoing: int) -> bool:
        """Whether `rank` packs its sends of a chunk into the free tail of its staging buffer.

        Every rank derives this from the global plan alone, so receivers know the message shapes.
        """
        return 0 < outgoing <= self.capacity - staged.n_in[rank]

    def _chunks(self, moves: list[Move], n_in: list[int]) -> list[list[tuple[int, Move]]]:
        """Split the remote moves into batches every rank derives alike from the global plan.

        Each batch takes from every sender as many moves as fit the free tail of its staging buffer
        (packed: one op per peer), or, without a tail, as many as keep its ops within `max_ops`.
        """
        by_sender: dict[int, list[tuple[int, Move]]] = {}
        for index, m in enumerate(moves):
            if not m.local:
                by_sender.setdefault(m.src_rank, []).append((index, m))
        parts = len(self.tensors) + 1
        quota = {src: self.capacity - n_in[src] if self.capacity > n_in[src]
                 else max(1, self.max_ops // parts) for src in by_sender}
        rounds = max((-(-len(v) // quota[src]) for src, v in by_sender.items()), default=0)
        return [[item for src in sorted(by_sender) for item in by_sender[src][c * quota[src]:(c + 1) * quota[src]]]
                for c in range(rounds)]

    def _split(self, chunk: list[tuple[int, Move]]) -> tuple[dict, dict, dict]:
        out_count: dict[int, int] = {}
        to_peer: dict[int, list[Move]] = {}
        from_peer: dict[int, list[tuple[int, Move]]] = {}
        for index, m in chunk:
            out_count[m.src_rank] = out_count.get(m.src_rank, 0) + 1
            if m.src_rank == self.rank:
                to_peer.setdefault(m.dst_rank, []).append((index, m))
            if m.dst_rank == self.rank:
                from_peer.setdefault(m.src_rank, []).append((index, m))
        return out_count, to_peer, from_peer

    def _chunk_ops(self, staged: StagedLayer, chunk_no: int, chunk: list[tuple[int, Move]]) -> tuple[list, int]:
        """-> (this rank's sends then receives of one chunk, number of sends); sends packed when possible."""
        out_count, to_peer, from_peer = self._split(chunk)
        layer, ops, buf = staged.layer, [], self.buf
        row = staged.n_in[self.rank]
        packing = self._packs(staged, self.rank, out_count.get(self.rank, 0))
        for peer in sorted(to_peer):
            moves = to_peer[peer]
            slots = self._index([m.src_slot for _, m in moves])
            if packing:
                rows = slice(row, row + len(moves))
                buf.fill(rows, self.tensors, layer, slots, self.slot_sums[layer, slots])
                ops.append(dist.P2POp(dist.isend, buf.flat[rows], peer, self.group, PACK_TAG + chunk_no))
                row += len(moves)
            else:
                for index, m in moves:
                    parts = [t[layer, m.src_slot] for t in self.tensors] + [self.slot_sums[layer, m.src_slot]]
                    ops += [dist.P2POp(dist.isend, p, peer, self.group, index * 8 + k) for k, p in enumerate(parts)]
            staged.bytes_sent += len(moves) * self.expert_bytes
        n_sends = len(ops)
        for peer in sorted(from_peer):
            moves = from_peer[peer]
            rows = [self._where[m] for _, m in moves]        # contiguous: staging is ordered by source
            if self._packs(staged, peer, out_count[peer]):
                ops.append(dist.P2POp(dist.irecv, buf.flat[rows[0]:rows[-1] + 1], peer, self.group,
                                      PACK_TAG + chunk_no))
            else:
                for (index, _), i in zip(moves, rows, strict=True):
                    parts = [v[i] for v in buf.views] + [buf.sums[i]]
                    ops += [dist.P2POp(dist.irecv, p, peer, self.group, index * 8 + k) for k, p in enumerate(parts)]
            staged.bytes_recv += len(moves) * self.expert_bytes
        return ops, n_sends

    def _next_chunk(self, staged: StagedLayer) -> None:
        staged._sends = []
        if not staged._chunks:
            return
        chunk_no, chunk = staged._chunks.pop(0)
        ops, n_sends = self._chunk_ops(staged, chunk_no, chunk)
        works = dist.batch_isend_irecv(ops) if ops else []
        for work in works:
            _on_done(work, staged._done)
        staged._sends = works[:n_sends]
        staged._recvs += works[n_sends:]

    def _wait_for(self, staged: StagedLayer, works: list) -> None:
        for work in works:
            if not work.wait(self.timeout):
                raise TimeoutError_(f"layer {staged.layer}: a transfer did not finish within "
                                    f"{self.timeout.total_seconds():.0f}s")

    def wait(self, staged: StagedLayer) -> bool:
        """Finish all chunks and verify what arrived; False (with `error`) instead of raising."""
        try:
            with self.side.active():
                self._finish_chunks(staged)
            # launch -> last byte, not -> when we looked: the wait comes only after a forward step
            finished = max(staged._done) if staged._done else time.perf_counter()
            staged.transfer_s = finished - staged.started
            if self.corrupt_next and staged.incoming:
                self.buf.views[0][0].view(-1)[0] += 1
                self.corrupt_next = False
            verify_start = time.perf_counter()
            with self.side.active():
                self._verify(staged)
            staged.verify_s = time.perf_counter() - verify_start
            staged.phase = Phase.STAGED
            return True
        except (TransferError, RuntimeError) as exc:
            staged.transfer_s = time.perf_counter() - staged.started
            staged.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            staged.error_kind = getattr(exc, "kind", "transfer")
            staged.phase = Phase.ABORTED
            return False

    def _finish_chunks(self, staged: StagedLayer) -> None:
        """The next chunk reuses only this rank's staging tail, so it goes out as soon as this rank's
        own sends are done; receives (distinct rows) are waited once, at the end."""
        self._wait_for(staged, staged._sends)
        while staged._chunks:
            self._next_chunk(staged)
            self._wait_for(staged, staged._sends)
        self._wait_for(staged, staged._recvs)
        staged._sends, staged._recvs = [], []

    def _verify(self, staged: StagedLayer) -> None:
        n = len(staged.incoming)
        if n == 0:
            return
        want = self.expert_sums[staged.layer][[m.expert for m in staged.incoming]]           # [n, T]
        got = torch.stack([batch_checksums(v[:n]) for v in self.buf.views], dim=1)             # [n, T]
        sent_bad = (self.buf.sums[:n] != want).any(dim=1)
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
                for view, t in zip(self.buf.views, self.tensors, strict=True):
                    t[staged.layer].index_copy_(0, dst, view[:n])
                self.slot_sums[staged.layer].index_copy_(0, dst, self.buf.sums[:n])
            self.side.before_forward()         # the next forward reads only committed weights
        staged.phase = Phase.COMMITTED
        staged.commit_s = time.perf_counter() - start
