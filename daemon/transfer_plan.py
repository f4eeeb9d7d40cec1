"""What a layer's redeployment moves, and in which P2P batch: pure data from the old and new placement,
computed identically on every rank, so receivers know every message's shape without asking.

Staging rows of rank r, in order: the receives of batch 0, of batch 1, ..., then its local copies.
While batch c is in flight the rows of later batches' receives hold nothing yet, so a sender packs its
batch-c sends (one message per peer) into the rows just after its own batch-c receives. Batch c+1 is
posted only after this rank's batch-c sends are done, and its receives then overwrite those rows. With
one layer of staging this is what sends a layer rewriting two thirds of every rank's slots in two
batches; keeping send rows apart from every receive row took three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


Indexed = tuple[int, Move]          # (index in the layer's move list, move)


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
    changed = [(int(new[n, s]), int(n), int(s)) for n, s in zip(*np.nonzero(old != new), strict=True)]
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


@dataclass(frozen=True)
class Batch:
    moves: tuple[Indexed, ...]      # remote moves of this batch, in move order
    packed: bool                    # senders ship one message per peer from staging, else one per tensor
    send_row: tuple[int, ...]       # [N] first staging row of each rank's packed sends


@dataclass(frozen=True)
class Schedule:
    batches: tuple[Batch, ...]
    rows: tuple[tuple[int, ...], ...]   # [N][n_in(r)] the move index each staging row of rank r receives
    local_row: tuple[int, ...]          # [N] first row of rank r's local copies (after every receive)
    send_end: tuple[int, ...]           # [N] one past the last row a packed send of rank r uses


def _round_robin(moves: list[Move]) -> list[Indexed]:
    """Remote moves interleaved across senders (each sender's in move order), so a batch that fills
    up has taken a share from every sender rather than all of the first one's."""
    by_sender: dict[int, list[Indexed]] = {}
    for index, m in enumerate(moves):
        if not m.local:
            by_sender.setdefault(m.src_rank, []).append((index, m))
    queues = [by_sender[s] for s in sorted(by_sender)]
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]


def _take(pending: list[Indexed], used: list[int], capacity: int, max_ops: int, parts: int,
          packed: bool, reserve: list[int]) -> list[Indexed]:
    """One batch from `pending`: each move whose two ends still have staging rows and ops to spare.

    reserve[r]: rows rank r keeps for its own sends in this batch, which could not wait for a later one.
    """
    n = len(used)
    rows, ops = list(used), [0] * n          # rows: received so far + this batch's receives and sends
    reserve = list(reserve)
    pairs: set[tuple[int, int]] = set()
    taken: list[Indexed] = []
    for index, m in pending:
        a, b = m.src_rank, m.dst_rank
        if rows[b] + 1 + reserve[b] > capacity or (packed and rows[a] + 1 > capacity):
            continue
        cost = int((a, b) not in pairs) if packed else parts
        if taken and max(ops[a], ops[b]) + cost > max_ops:
            continue
        pairs.add((a, b))
        ops[a] += cost
        ops[b] += cost
        rows[b] += 1
        rows[a] += packed
        reserve[a] = max(0, reserve[a] - packed)
        taken.append((index, m))
    return sorted(taken, key=lambda item: item[0])


def one_batch_rows(moves: list[Move], num_ranks: int) -> int:
    """Staging rows the busiest rank needs for the layer to go in one batch: its receives plus its
    packed sends."""
    need = [0] * num_ranks
    for m in moves:
        need[m.dst_rank] += 1
        need[m.src_rank] += not m.local
    return max(need)


def schedule(moves: list[Move], num_ranks: int, capacity: int, max_ops: int, parts: int) -> Schedule:
    """moves (one layer, every rank) -> its batches and every rank's staging rows.

    A batch packs whenever some move fits both ends' free rows. Only when none does (a rank whose rows
    all hold receives still has sends) do moves go one message per tensor. A batch has at most
    `max_ops` ops per rank (at least one move). ValueError when a rank needs more than `capacity` rows.
    """
    n_in = [0] * num_ranks
    for m in moves:
        n_in[m.dst_rank] += 1
    worst = max(range(num_ranks), key=n_in.__getitem__)
    if n_in[worst] > capacity:
        raise ValueError(f"rank {worst} needs {n_in[worst]} staging slots, capacity is {capacity}")
    pending = _round_robin(moves)
    received = [0] * num_ranks
    send_end = [0] * num_ranks
    rows: list[list[int]] = [[] for _ in range(num_ranks)]
    batches: list[Batch] = []
    while pending:
        # the sends that cannot all fit beside a rank's receives in a last batch must go in this one
        left = [0] * num_ranks
        for _, m in pending:
            left[m.src_rank] += 1
        reserve = [max(0, n_in[r] + left[r] - capacity) for r in range(num_ranks)]
        urgent = sorted(pending, key=lambda item: reserve[item[1].src_rank] == 0)
        taken = _take(urgent, received, capacity, max_ops, parts, packed=True, reserve=reserve)
        packed = bool(taken)
        if not packed:
            taken = _take(pending, received, capacity, max_ops, parts, packed=False, reserve=[0] * num_ranks)
        for index, m in sorted(taken, key=lambda item: (item[1].src_rank, item[0])):
            rows[m.dst_rank].append(index)       # one contiguous run per peer
            received[m.dst_rank] += 1
        sends = [0] * num_ranks
        for _, m in taken:
            sends[m.src_rank] += packed
        send_end = [max(end, received[r] + sends[r]) for r, end in enumerate(send_end)]
        batches.append(Batch(tuple(taken), packed, tuple(received)))
        chosen = {index for index, _ in taken}
        pending = [item for item in pending if item[0] not in chosen]
    local_row = tuple(received)
    for index, m in enumerate(moves):
        if m.local:
            rows[m.dst_rank].append(index)
    return Schedule(tuple(batches), tuple(map(tuple, rows)), local_row, tuple(send_end))
