"""The transfer engine on real gloo processes: every per-expert tensor lands in its slot, on every path.

Each case starts 3 ranks that hold real expert weights, redeploys two layers to random placements and
checks every live slot against the weights its expert must have. Cases cover the packed path (one
message per peer), a staging buffer with no row to spare (packed sends reuse the rows of later
receives), one op per batch, sends that must go one message per tensor, two layers in flight in one
buffer, the same without the transfer thread (as on a device: later batches posted in `wait`), and a
corrupted receive (caught by verification, nothing committed).
"""

from __future__ import annotations

import os
import queue
import tempfile
from datetime import timedelta

import numpy as np
import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.timeout(180)

RANKS, LAYERS, EXPERTS, SLOTS, HIDDEN, FFN = 3, 2, 7, 3, 4, 6


def _placements(seed: int, case: str = "") -> tuple[np.ndarray, np.ndarray]:
    from eplbctl.placement import contiguous_placement
    from eplbctl.policies.random import random_layer

    rng = np.random.default_rng(seed)
    start = contiguous_placement(LAYERS, EXPERTS, RANKS, SLOTS)
    if case == "unpacked":
        # a ring of single moves into one staging row: the last sender's only row holds its receive
        target = start.copy()
        target[:, :, 0] = np.roll(start[:, :, 0], 1, axis=1)
        return start, target
    target = np.stack([random_layer(EXPERTS, RANKS, SLOTS, rng) for _ in range(LAYERS)])
    return start, target


def _rank(rank: int, store: str, case: str, out) -> None:
    import torch
    import torch.distributed as dist
    from eplbd.moe import ExpertStore, MoEShape, make_expert
    from eplbd.staging import checksum, slot_checksums
    from eplbd.transfer import TransferEngine
    from eplbd.transfer_plan import plan_layer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    # votes on a group of their own: the engine's thread may still be moving the next layer on `group`
    votes = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    start, target = _placements(7, case)
    shape = MoEShape(LAYERS, EXPERTS, RANKS, SLOTS, HIDDEN, FFN, 2, 4)
    weights = ExpertStore(shape, 0, torch.device("cpu"))
    weights.load(start[:, rank])
    tensors = weights.tensors
    expert_sums = torch.stack([torch.stack([torch.stack([checksum(p) for p in make_expert(0, la, e, HIDDEN, FFN)])
                                            for e in range(EXPERTS)]) for la in range(LAYERS)])   # [L, E, T]
    slot_sums = torch.stack([torch.stack([slot_checksums(tensors, la, s) for s in range(SLOTS)])
                             for la in range(LAYERS)])
    need = max(sum(1 for m in plan_layer(start[la], target[la]) if m.dst_rank == r)
               for la in range(LAYERS) for r in range(RANKS))
    capacity = {"packed": SLOTS, "no_tail": need, "one_op": SLOTS, "corrupt": SLOTS, "unpacked": 1,
                "two_in_flight": 4 * SLOTS, "inline": 4 * SLOTS}[case]
    engine = TransferEngine(tensors, rank, group, max(1, capacity), 1 if case == "one_op" else 64, 30.0,
                            expert_sums, slot_sums, threaded=False if case == "inline" else None)
    engine.warm_up(RANKS)
    results = []
    if case in ("two_in_flight", "inline"):   # both layers staged at once, each in its own rows of one buffer
        first = engine.prepare(0, start[0], target[0])
        second = engine.prepare(1, start[1], target[1], first_row=first.rows_used)
        flights = [[first, second]]
    else:
        flights = [[engine.prepare(la, start[la], target[la])] for la in range(LAYERS)]
    for flight in flights:
        for staged in flight:
            staged.corrupt = case == "corrupt" and rank == 1 and staged.layer == 0
            engine.launch(staged)
        for staged in flight:
            ok = engine.wait(staged)
            vote = torch.tensor([int(ok)])
            dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=votes)
            if vote.item():
                engine.commit(staged)
            results.append((ok, bool(vote.item()), staged.error))
    holds = []
    for la in range(LAYERS):
        row = []
        for s in range(SLOTS):
            live = [t[la, s] for t in tensors]
            row.append(next((e for e in range(EXPERTS)
                             if all(torch.equal(a, b) for a, b in zip(live, make_expert(0, la, e, HIDDEN, FFN),
                                                                        strict=True))), -1))
        holds.append(row)
    out.put((rank, results, holds))
    out.close()
    out.join_thread()   # flush the result before os._exit, which would kill the queue's feeder thread
    dist.barrier(group=votes)
    os._exit(0)


def _spawn(target, *args) -> dict[int, tuple]:
    """RANKS processes of `target(rank, store, *args, out)`; -> {rank: what it put after its rank}.
    Every process is joined or killed and the rendezvous file removed, whatever happens."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = tempfile.mktemp(prefix="eplbt-store-")
    procs = [ctx.Process(target=target, args=(r, store, *args, out), daemon=True) for r in range(RANKS)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(RANKS):
            rank, *rest = out.get(timeout=150)
            got[rank] = tuple(rest)
        return got
    except queue.Empty:
        pytest.fail(f"{target.__name__}{args} did not finish within 150 s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if os.path.exists(store):
            os.unlink(store)


def _run(case: str) -> dict[int, tuple]:
    return {rank: (results, np.array(holds)) for rank, (results, holds) in _spawn(_rank, case).items()}


@pytest.mark.parametrize("case", ["packed", "no_tail", "one_op", "unpacked", "two_in_flight", "inline"])
def test_every_per_expert_tensor_lands_in_its_new_slot(case):
    from eplbd.transfer_plan import plan_layer, schedule

    start, target = _placements(7, case)
    if case == "unpacked":      # the case must really take the one-message-per-tensor path
        plan = schedule(plan_layer(start[0], target[0]), RANKS, 1, 64, 4)
        assert not plan.batches[-1].packed
    got = _run(case)
    for rank, (results, holds) in got.items():
        assert all(ok and voted for ok, voted, _ in results), results
        np.testing.assert_array_equal(holds, target[:, rank])   # w1, w2 and scale all equal the expert's
    assert (start != target).any()


def test_corrupted_receive_is_caught_and_no_rank_commits():
    start, _ = _placements(7)
    got = _run("corrupt")
    results, _ = got[1]
    assert results[0][0] is False and "corrupted" in results[0][2]
    for _rank, (res, holds) in got.items():
        assert res[0][1] is False                                # the vote failed everywhere
        np.testing.assert_array_equal(holds[0], start[0, _rank])  # layer 0 unchanged on every rank


def _slow_peer_rank(rank: int, store: str, out) -> None:
    import time

    import torch
    import torch.distributed as dist
    from eplbd.moe import ExpertStore, MoEShape
    from eplbd.staging import slot_checksums
    from eplbd.transfer import TransferEngine, TransferError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    votes = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    start, target = _placements(7)
    shape = MoEShape(LAYERS, EXPERTS, RANKS, SLOTS, HIDDEN, FFN, 2, 4)
    weights = ExpertStore(shape, 0, torch.device("cpu"))
    weights.load(start[:, rank])
    slot_sums = torch.stack([torch.stack([slot_checksums(weights.tensors, la, s) for s in range(SLOTS)])
                             for la in range(LAYERS)])
    engine = TransferEngine(weights.tensors, rank, group, SLOTS, 64, 1.0, torch.zeros(LAYERS, EXPERTS, 3,
                            dtype=torch.int64), slot_sums)
    staged = engine.prepare(0, start[0], target[0])
    if rank == 1:
        time.sleep(3.0)                       # alive, but past the others' 1 s transfer timeout
    engine.launch(staged)
    first = (engine.wait(staged), staged.error_kind)
    try:
        engine.prepare(1, start[1], target[1])
        second = "prepared"
    except TransferError as exc:
        second = str(exc)
    out.put((rank, first, second))
    out.close()
    out.join_thread()
    dist.barrier(group=votes)
    os._exit(0)


def test_after_a_transfer_timeout_the_engine_refuses_to_move_experts_again():
    """A peer past the time limit makes the transfer fail; its ops may still land late in staging,
    where a later layer's verified rows could be overwritten before commit. So the engine stops."""
    got = _spawn(_slow_peer_rank)
    failed = sorted(r for r, (first, _) in got.items() if first[0] is False)
    assert {0, 2} <= set(failed), got                    # the ranks that waited on rank 1 gave up
    for r in failed:
        assert "restart eplbd" in got[r][1], got          # and move nothing more
    for r in set(got) - set(failed):
        assert got[r][1] == "prepared", got
