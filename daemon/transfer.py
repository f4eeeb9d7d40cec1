"""Redeployment of one layer: the transfer plan (data, identical on every rank) and its execution.

Phases of a layer, in order:  PLANNED -> STAGING -> STAGED (verified) -> voted -> COMMITTED | ABORTED.
Receives land in reusable staging buffers while the live weights keep serving; nothing live changes
before every rank has voted that its staged tensors verified. Sends read live slots, which stay
untouched until the commit, so no staging buffer is ever read and overwritten at once.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


class Phase(enum.Enum):
    PLANNED = "planned"
    STAGING = "staging"
    STAGED = "staged"
    COMMITTED = "committed"
    ABORTED = "aborted"


class TransferError(RuntimeError):
    """A layer could not be staged: a peer died or timed out, or a tensor failed verification."""


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


_POSITION_WEIGHTS: dict[int, torch.Tensor] = {}


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Exact, order-sensitive fingerprint of a float32 tensor's bits -> int64 scalar on its device."""
    flat = tensor.reshape(-1).view(torch.int32).to(torch.int64)
    key = flat.numel()
    weights = _POSITION_WEIGHTS.get(key)
    if weights is None or weights.device != flat.device:
        weights = torch.arange(key, dtype=torch.int64, device=flat.device) % 251 + 1
        _POSITION_WEIGHTS[key] = weights
    return (flat * weights).sum()


def batch_checksums(batch: torch.Tensor) -> torch.Tensor:
    """[n, ...] float32 -> [n] int64, row i equal to checksum(batch[i])."""
    n = batch.shape[0]
    flat = batch.reshape(n, -1).view(torch.int32).to(torch.int64)
    key = flat.shape[1]
    weights = _POSITION_WEIGHTS.get(key)
    if weights is None or weights.device != flat.device:
        weights = torch.arange(key, dtype=torch.int64, device=flat.device) % 251 + 1
        _POSITION_WEIGHTS[key] = weights
    return (flat * weights).sum(dim=1)


def slot_checksums(tensors: list[torch.Tensor], layer: int, slot: int) -> torch.Tensor:
    """-> [T] int64: one checksum per per-expert tensor of a slot."""
    return torch.stack([checksum(t[layer, slot]) for t in tensors])


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
    transfer_s: float = 0.0                 # launch -> every byte arrived
    verify_s: float = 0.0
    commit_s: float = 0.0
    error: str | None = None
    n_in: list[int] = field(default_factory=list)  # staging rows each rank needs for this layer
    _chunks: list = field(default_factory=list)   # [(chunk number, [(move index, move)])] still to send
    _works: list = field(default_factory=list)
    _keep: list = field(default_factory=list)     # send buffers alive until their wait
    _recv_works: list = field(default_factory=list)
    _landings: list = field(default_factory=list)  # (sender checksums buffer, staging rows)
    _done: list = field(default_factory=list)     # completion times of the P2P works (when known)


# Tags: per-expert messages use move index * 8 + tensor; packed runs and checksums live above them.
PACK_TAG = 1 << 22
SUMS_TAG = 1 << 24


class TransferEngine:
    """Moves expert weights of one layer at a time between ranks over a dedicated process group.

    Senders ship, beside the weights, the checksums they computed from those very slots when the
    slots were last written (`slot_sums`), one message per peer and chunk; receivers check what
    arrived against them and against the expert's known checksum, so corruption in flight and a
    wrong source slot are both caught before anything is committed.
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
        self.staging = [torch.empty((capacity, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in tensors]
        self.recv_sums = torch.zeros(capacity, len(tensors), dtype=torch.int64, device=tensors[0].device)
        self.corrupt_next = False             # fault injection: flip one staged value before verify

    @property
    def staging_bytes(self) -> int:
        sizes = [b.numel() * b.element_size() for b in self.staging]
        return sum(sizes) + self.recv_sums.numel() * self.recv_sums.element_size()

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
            raise TransferError(f"layer {layer} needs {len(incoming)} staging slots on rank {self.rank}, "
                                f"capacity is {self.capacity}")
        staged._chunks = self._chunks(moves, staged.n_in)
        staged.plan_s = time.perf_counter() - start
        return staged

    def launch(self, staged: StagedLayer) -> None:
        """Start the local copies and the first chunk of receives/sends; returns without waiting."""
        staged.started = time.perf_counter()
        staged.phase = Phase.STAGING
        self._where = {m: i for i, m in enumerate(staged.incoming)}
        for i, m in enumerate(staged.incoming):
            if m.local:
                for buf, t in zip(self.staging, self.tensors, strict=True):
                    buf[i].copy_(t[staged.layer, m.src_slot])
                self.recv_sums[i] = self.slot_sums[staged.layer, m.src_slot]
        chunks = list(enumerate(staged._chunks))
        staged._recv_works = self._post([op for no, c in chunks for op in self._recv_ops(staged, no, c)], staged)
        staged._chunks = chunks
        if chunks:
            chunk_no, chunk = staged._chunks.pop(0)
            staged._works = self._post(self._send_ops(staged, chunk_no, chunk), staged)

    def _chunks(self, moves: list[Move], n_in: list[int]) -> list[list[tuple[int, Move]]]:
        """Split the remote moves into batches every rank derives alike from the global plan.

        Each batch takes from every sender at most `max_ops` moves and no more than fit the free tail
        of its staging buffer, so all senders work at once and each can pack its part of a batch.
        """
        by_sender: dict[int, list[tuple[int, Move]]] = {}
        for index, m in enumerate(moves):
            if not m.local:
                by_sender.setdefault(m.src_rank, []).append((index, m))
        quota = {src: max(1, min(self.max_ops, self.capacity - n_in[src])) for src in by_sender}
        rounds = max((-(-len(v) // quota[src]) for src, v in by_sender.items()), default=0)
        return [[item for src in sorted(by_sender) for item in by_sender[src][c * quota[src]:(c + 1) * quota[src]]]
                for c in range(rounds)]

    def _packs(self, staged: StagedLayer, rank: int, outgoing: int) -> bool:
        """Whether `rank` packs its sends of a chunk into the free tail of its staging buffer.

        Every rank derives this from the global plan alone, so receivers know the message shapes.
        Packing turns one message per expert tensor into one per peer; without room it falls back.
        """
        return 0 < outgoing <= self.capacity - staged.n_in[rank]

    def _split(self, chunk: list[tuple[int, Move]]) -> tuple[dict, dict, dict]:
        out_count: dict[int, int] = {}
        to_peer: dict[int, list[tuple[int, Move]]] = {}
        from_peer: dict[int, list[tuple[int, Move]]] = {}
        for index, m in chunk:
            out_count[m.src_rank] = out_count.get(m.src_rank, 0) + 1
            if m.src_rank == self.rank:
                to_peer.setdefault(m.dst_rank, []).append((index, m))
            if m.dst_rank == self.rank:
                from_peer.setdefault(m.src_rank, []).append((index, m))
        return out_count, to_peer, from_peer

    def _send_ops(self, staged: StagedLayer, chunk_no: int, chunk: list[tuple[int, Move]]) -> list:
        """This rank's sends of one chunk, packed into the staging tail when there is room."""
        out_count, to_peer, _ = self._split(chunk)
        layer, ops = staged.layer, []
        row = staged.n_in[self.rank]
        packing = self._packs(staged, self.rank, out_count.get(self.rank, 0))
        for peer in sorted(to_peer):
            moves = to_peer[peer]
            slots = [m.src_slot for _, m in moves]
            if packing:
                idx = torch.tensor(slots, dtype=torch.int64, device=self.recv_sums.device)
                for k, (buf, t) in enumerate(zip(self.staging, self.tensors, strict=True)):
                    packed = buf[row:row + len(moves)]
                    torch.index_select(t[layer], 0, idx, out=packed)
                    ops.append(dist.P2POp(dist.isend, packed, peer, self.group, PACK_TAG + chunk_no * 8 + k))
                row += len(moves)
            else:
                for index, m in moves:
                    for k, t in enumerate(self.tensors):
                        ops.append(dist.P2POp(dist.isend, t[layer, m.src_slot], peer, self.group, index * 8 + k))
            staged.bytes_sent += len(moves) * sum(t[layer, 0].numel() * t.element_size() for t in self.tensors)
            sums = self.slot_sums[layer, slots].contiguous()                          # [n, T]
            staged._keep.append(sums)
            ops.append(dist.P2POp(dist.isend, sums, peer, self.group, SUMS_TAG + chunk_no))
        return ops

    def _recv_ops(self, staged: StagedLayer, chunk_no: int, chunk: list[tuple[int, Move]]) -> list:
        """This rank's receives of one chunk, straight into their staging rows."""
        out_count, _, from_peer = self._split(chunk)
        ops = []
        for peer in sorted(from_peer):
            moves = from_peer[peer]
            rows = [self._where[m] for _, m in moves]        # contiguous: staging is ordered by source
            if self._packs(staged, peer, out_count[peer]):
                for k, buf in enumerate(self.staging):
                    ops.append(dist.P2POp(dist.irecv, buf[rows[0]:rows[-1] + 1], peer, self.group,
                                          PACK_TAG + chunk_no * 8 + k))
            else:
                for (index, _), i in zip(moves, rows, strict=True):
                    for k, buf in enumerate(self.staging):
                        ops.append(dist.P2POp(dist.irecv, buf[i], peer, self.group, index * 8 + k))
            staged.bytes_recv += len(moves) * sum(b[0].numel() * b.element_size() for b in self.staging)
            landing = torch.empty(len(rows), len(self.tensors), dtype=torch.int64)
            staged._landings.append((landing, rows))
            ops.append(dist.P2POp(dist.irecv, landing, peer, self.group, SUMS_TAG + chunk_no))
        return ops

    def _post(self, ops: list, staged: StagedLayer) -> list:
        works = dist.batch_isend_irecv(ops) if ops else []
        for work in works:
            _on_done(work, staged._done)
        return works

    def _wait_all(self, works: list, staged: StagedLayer) -> None:
        for work in works:
            if not work.wait(self.timeout):
                raise TransferError(f"layer {staged.layer}: a transfer did not finish within "
                                    f"{self.timeout.total_seconds():.0f}s")

    def wait(self, staged: StagedLayer) -> bool:
        """Finish all chunks and verify what arrived; False (with `error`) instead of raising."""
        try:
            # Receives were all posted at launch; sends go chunk by chunk, because the next chunk is
            # packed into the same staging tail only once the previous chunk's sends are done.
            while staged._chunks:
                self._wait_all(staged._works, staged)
                staged._keep = []
                chunk_no, chunk = staged._chunks.pop(0)
                staged._works = self._post(self._send_ops(staged, chunk_no, chunk), staged)
            self._wait_all(staged._works, staged)
            self._wait_all(staged._recv_works, staged)
            staged._works, staged._recv_works, staged._keep = [], [], []
            for landing, rows in staged._landings:
                self.recv_sums[rows] = landing
            staged._landings = []
            # launch -> last byte, not -> when we looked: the wait comes only after a forward step
            finished = max(staged._done) if staged._done else time.perf_counter()
            staged.transfer_s = finished - staged.started
            if self.corrupt_next and staged.incoming:
                self.staging[0][0].view(-1)[0] += 1.0
                self.corrupt_next = False
            verify_start = time.perf_counter()
            self._verify(staged)
            staged.verify_s = time.perf_counter() - verify_start
            staged.phase = Phase.STAGED
            return True
        except (TransferError, RuntimeError) as exc:
            staged.transfer_s = time.perf_counter() - staged.started
            staged.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            staged.phase = Phase.ABORTED
            return False

    def _verify(self, staged: StagedLayer) -> None:
        n = len(staged.incoming)
        if n == 0:
            return
        expected = self.expert_sums[staged.layer]
        want = expected[[m.expert for m in staged.incoming]]                        # [n, T]
        got = torch.stack([batch_checksums(buf[:n]) for buf in self.staging], dim=1)  # [n, T]
        sent_bad = (self.recv_sums[:n] != want).any(dim=1)
        got_bad = (got != want).any(dim=1)
        if bool(sent_bad.any()):
            m = staged.incoming[int(sent_bad.nonzero()[0])]
            raise TransferError(f"layer {staged.layer}: rank {m.src_rank} sent expert {m.expert} from slot "
                                f"{m.src_slot} whose checksum does not match the expert's (wrong slot?)")
        if bool(got_bad.any()):
            m = staged.incoming[int(got_bad.nonzero()[0])]
            raise TransferError(f"layer {staged.layer}: expert {m.expert} arrived corrupted on rank "
                                f"{self.rank} slot {m.dst_slot} (checksum mismatch)")
        self._verified = want

    def commit(self, staged: StagedLayer) -> None:
        """Copy verified staging buffers into their live slots (in place, tensors never reallocated)."""
        start = time.perf_counter()
        for i, m in enumerate(staged.incoming):
            for buf, t in zip(self.staging, self.tensors, strict=True):
                t[staged.layer, m.dst_slot].copy_(buf[i])
            self.slot_sums[staged.layer, m.dst_slot] = self.expert_sums[staged.layer, m.expert]
        staged.phase = Phase.COMMITTED
        staged.commit_s = time.perf_counter() - start
