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
    transfer_s: float = 0.0
    commit_s: float = 0.0
    error: str | None = None
    _chunks: list[list[tuple[int, Move]]] = field(default_factory=list)
    _works: list = field(default_factory=list)
    _sent_sums: dict[int, torch.Tensor] = field(default_factory=dict)


class TransferEngine:
    """Moves expert weights of one layer at a time between ranks over a dedicated process group."""

    def __init__(self, tensors: list[torch.Tensor], rank: int, group: dist.ProcessGroup,
                 capacity: int, max_ops: int, timeout_s: float, expert_sums: torch.Tensor) -> None:
        self.tensors = tensors                # each [L, S, ...]: every per-expert tensor
        self.rank = rank
        self.group = group
        self.capacity = capacity
        self.max_ops = max(1, max_ops)
        self.timeout = timedelta(seconds=timeout_s)
        self.expert_sums = expert_sums        # [L, E, T] int64: what each expert's tensors must hash to
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
        incoming = [m for m in moves if m.dst_rank == self.rank]
        staged = StagedLayer(layer, moves, incoming)
        if len(incoming) > self.capacity:
            raise TransferError(f"layer {layer} needs {len(incoming)} staging slots on rank {self.rank}, "
                                f"capacity is {self.capacity}")
        # Chunks follow the global move order, so every rank posts matching ops chunk by chunk.
        remote = [(index, m) for index, m in enumerate(moves) if not m.local]
        staged._chunks = [remote[i:i + self.max_ops] for i in range(0, len(remote), self.max_ops)]
        staged.plan_s = time.perf_counter() - start
        return staged

    def launch(self, staged: StagedLayer) -> None:
        """Start the first chunk of receives/sends and the local copies; returns without waiting."""
        staged.started = time.perf_counter()
        staged.phase = Phase.STAGING
        for i, m in enumerate(staged.incoming):
            if m.local:
                for buf, t in zip(self.staging, self.tensors, strict=True):
                    buf[i].copy_(t[staged.layer, m.src_slot])
        self._launch_chunk(staged)

    def _launch_chunk(self, staged: StagedLayer) -> None:
        if not staged._chunks:
            return
        chunk = staged._chunks.pop(0)
        ops = []
        layer = staged.layer
        for index, m in chunk:
            # one tag per (move, tensor): the move index is global, so both ends compute the same tag
            tags = [index * 8 + k for k in range(len(self.tensors) + 1)]
            if m.src_rank == self.rank:
                sums = slot_checksums(self.tensors, layer, m.src_slot)
                staged._sent_sums[index] = sums  # keeps the send buffer alive until the wait
                for tag, t in zip(tags, self.tensors, strict=False):
                    ops.append(dist.P2POp(dist.isend, t[layer, m.src_slot], m.dst_rank, self.group, tag))
                    staged.bytes_sent += t[layer, m.src_slot].numel() * t.element_size()
                ops.append(dist.P2POp(dist.isend, sums, m.dst_rank, self.group, tags[-1]))
            if m.dst_rank == self.rank:
                i = staged.incoming.index(m)
                for tag, buf in zip(tags, self.staging, strict=False):
                    ops.append(dist.P2POp(dist.irecv, buf[i], m.src_rank, self.group, tag))
                    staged.bytes_recv += buf[i].numel() * buf.element_size()
                ops.append(dist.P2POp(dist.irecv, self.recv_sums[i], m.src_rank, self.group, tags[-1]))
        staged._works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self, staged: StagedLayer) -> bool:
        """Finish all chunks and verify what arrived; False (with `error`) instead of raising."""
        try:
            while True:
                for work in staged._works:
                    if not work.wait(self.timeout):
                        raise TransferError(f"layer {staged.layer}: a transfer did not finish within "
                                            f"{self.timeout.total_seconds():.0f}s")
                staged._works = []
                if not staged._chunks:
                    break
                self._launch_chunk(staged)
            staged.transfer_s = time.perf_counter() - staged.started
            if self.corrupt_next and staged.incoming:
                self.staging[0][0].view(-1)[0] += 1.0
                self.corrupt_next = False
            self._verify(staged)
            staged.phase = Phase.STAGED
            return True
        except (TransferError, RuntimeError) as exc:
            staged.transfer_s = time.perf_counter() - staged.started
            staged.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            staged.phase = Phase.ABORTED
            return False

    def _verify(self, staged: StagedLayer) -> None:
        expected = self.expert_sums[staged.layer]
        for i, m in enumerate(staged.incoming):
            got = torch.stack([checksum(buf[i]) for buf in self.staging])
            want = expected[m.expert]
            if not m.local and not torch.equal(self.recv_sums[i], want):
                raise TransferError(f"layer {staged.layer}: rank {m.src_rank} sent expert {m.expert} "
                                    f"from slot {m.src_slot} whose checksum does not match the expert's")
            if not torch.equal(got, want):
                raise TransferError(f"layer {staged.layer}: expert {m.expert} arrived corrupted on rank "
                                    f"{self.rank} slot {m.dst_slot} (checksum mismatch)")

    def commit(self, staged: StagedLayer) -> None:
        """Copy verified staging buffers into their live slots (in place, tensors never reallocated)."""
        start = time.perf_counter()
        for i, m in enumerate(staged.incoming):
            for buf, t in zip(self.staging, self.tensors, strict=True):
                t[staged.layer, m.dst_slot].copy_(buf[i])
        staged.phase = Phase.COMMITTED
        staged.commit_s = time.perf_counter() - start
