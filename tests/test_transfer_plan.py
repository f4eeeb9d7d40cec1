"""The transfer plan and its batch schedule, as pure data: every rank derives the same one, and no
staging row is ever written while a send still reads it."""

from __future__ import annotations

import numpy as np
import pytest
from eplbd.transfer_plan import plan_layer, schedule

from eplbctl.placement import contiguous_placement
from eplbctl.policies.random import random_layer

PARTS = 4


def _plan(seed: int, ranks: int, experts: int, slots: int):
    rng = np.random.default_rng(seed)
    old = contiguous_placement(1, experts, ranks, slots)[0]
    new = random_layer(experts, ranks, slots, rng)
    return old, new, plan_layer(old, new)


def _check(moves, ranks: int, capacity: int, max_ops: int) -> None:
    plan = schedule(moves, ranks, capacity, max_ops, PARTS)
    remote = [i for i, m in enumerate(moves) if not m.local]
    batched = [i for b in plan.batches for i, _ in b.moves]
    assert sorted(batched) == remote                          # every remote move exactly once
    for r in range(ranks):
        mine = [i for i, m in enumerate(moves) if m.dst_rank == r]
        assert sorted(plan.rows[r]) == mine                   # one staging row per incoming move
        assert len(plan.rows[r]) <= capacity
        assert all(moves[i].local for i in plan.rows[r][plan.local_row[r]:])
        assert plan.send_end[r] <= capacity
    received = [0] * ranks
    for batch in plan.batches:
        sends, ops = [0] * ranks, [0] * ranks
        pairs = set()
        for index, m in batch.moves:
            row = plan.rows[m.dst_rank].index(index)
            assert received[m.dst_rank] <= row                # lands after every earlier batch's rows
            sends[m.src_rank] += 1
            pairs.add((m.src_rank, m.dst_rank))
        for _, m in batch.moves:
            received[m.dst_rank] += 1
        for r in range(ranks):
            if batch.packed and sends[r]:
                # packed sends sit after every receive so far and inside the buffer
                assert batch.send_row[r] == received[r]
                assert batch.send_row[r] + sends[r] <= capacity
            peer_runs = [moves[i].src_rank for i in plan.rows[r] if any(i == j for j, _ in batch.moves)]
            assert peer_runs == sorted(peer_runs)            # one contiguous run per sender
        for a, b in pairs:
            ops[a] += 1 if batch.packed else 0
            ops[b] += 1 if batch.packed else 0
        if not batch.packed:
            for _, m in batch.moves:
                ops[m.src_rank] += PARTS
                ops[m.dst_rank] += PARTS
        assert len(batch.moves) == 1 or max(ops) <= max_ops   # bounded, but never an empty batch


@pytest.mark.parametrize("seed", range(40))
def test_schedule_never_reuses_a_row_a_send_still_reads(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    ranks = int(rng.integers(2, 6))
    slots = int(rng.integers(2, 9))
    experts = int(rng.integers(max(ranks, slots), ranks * slots + 1))
    _, _, moves = _plan(seed, ranks, experts, slots)
    need = max([sum(1 for m in moves if m.dst_rank == r) for r in range(ranks)] + [1])
    for capacity in (need, need + 1, slots, 2 * slots):
        if capacity >= need:
            _check(moves, ranks, capacity, int(rng.choice([1, 3, 8, 64])))


def test_first_rebalance_of_deepseek_v3_with_one_layer_of_staging_takes_two_packed_batches() -> None:
    """The demo's first rebalance rewrites about two thirds of every rank's slots: receives and packed
    sends cannot share one layer of rows in one batch, but reusing later receives' rows makes it two."""
    from eplbd.sim import SimConfig, load_trace

    from eplbctl.planning import make_plan
    from eplbctl.policies import get_policy
    from eplbctl.policies.base import Topology

    heat, _, _ = load_trace(SimConfig(layers=8))
    start = contiguous_placement(8, 256, 4, 72)
    target = make_plan(heat, start, Topology(4, 72), get_policy("default")).placement
    for layer in range(8):
        moves = plan_layer(start[layer], target[layer])
        n_in = [sum(1 for m in moves if m.dst_rank == r) for r in range(4)]
        n_out = [sum(1 for m in moves if m.src_rank == r and not m.local) for r in range(4)]
        assert max(i + o for i, o in zip(n_in, n_out, strict=True)) > 72
        plan = schedule(moves, 4, 72, 64, PARTS)
        assert len(plan.batches) == 2 and all(b.packed for b in plan.batches)
        _check(moves, 4, 72, 64)


def test_a_rank_whose_rows_all_hold_receives_still_sends_unpacked() -> None:
    old = np.array([[0], [1], [2]])
    new = np.array([[1], [2], [0]])         # a ring: every rank sends one and receives one
    moves = plan_layer(old, new)
    plan = schedule(moves, 3, 1, 64, PARTS)
    assert [b.packed for b in plan.batches][-1] is False
    _check(moves, 3, 1, 64)


def test_more_receives_than_staging_rows_is_refused() -> None:
    old = np.array([[0, 1], [2, 3]])
    new = np.array([[2, 3], [0, 1]])
    with pytest.raises(ValueError, match="rank 0 needs 2 staging slots, capacity is 1"):
        schedule(plan_layer(old, new), 2, 1, 64, PARTS)
