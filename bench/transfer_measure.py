"""The transfer measurements of bench/overhead.py: the engine, raw batch_isend_irecv of the same bytes
without and with gathering the slots first, timed from a start all ranks share, rep by rep."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist


def timed(group, fn) -> float:
    """Seconds from a start all ranks share to this rank's own completion (the engine's transfer_s
    is the same span: launch, right after a barrier, to its last wait)."""
    dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_run(moves, rank: int, tensors: list[torch.Tensor], layer: int, group, pack: bool):
    """A raw batch_isend_irecv of the bytes the engine moves, one message per (src, dst) pair.

    pack=False sends ready-made buffers: the link's bandwidth. pack=True first gathers each peer's
    slots from the live tensors into its message: the one copy any engine that sends one message per
    peer must make (on CPU loopback it costs about what the transfer itself does).
    """
    out: dict[int, list[int]] = {}
    inc: dict[int, int] = {}
    for m in moves:
        if m.local:
            continue
        if m.src_rank == rank:
            out.setdefault(m.dst_rank, []).append(m.src_slot)
        if m.dst_rank == rank:
            inc[m.src_rank] = inc.get(m.src_rank, 0) + 1
    sizes = [t[layer, 0].numel() for t in tensors]
    index = {p: torch.tensor(v) for p, v in out.items()}
    sends = {p: torch.ones(len(v), sum(sizes)) for p, v in out.items()}
    recvs = {p: torch.empty(n, sum(sizes)) for p, n in inc.items()}

    def run() -> None:
        if pack:
            for p, buf in sends.items():
                at = 0
                for t, size in zip(tensors, sizes, strict=True):
                    torch.index_select(t[layer].reshape(t.shape[1], -1), 0, index[p], out=buf[:, at:at + size])
                    at += size
        ops = [dist.P2POp(dist.irecv, t, p, group) for p, t in recvs.items()]
        ops += [dist.P2POp(dist.isend, t, p, group) for p, t in sends.items()]
        for w in dist.batch_isend_irecv(ops) if ops else []:
            w.wait()
    return run


def engine_run(agent, engine, layer: int, new_row: np.ndarray, record: list):
    def run() -> None:
        staged = engine.prepare(layer, agent.placement[layer], new_row)
        # ranks start the transfer together, as raw does: skew in planning is plan_s, not bandwidth
        dist.barrier(group=agent.xfer)
        engine.launch(staged)
        if not engine.wait(staged):
            raise RuntimeError(staged.error)
        record.append(staged)
    return run


def transfer_layer(agent, wide, layer: int, new_row: np.ndarray, moves, reps: int) -> dict:
    """The engine (and `wide`, the same engine with more staging), raw and raw with packing on one
    layer, interleaved rep by rep so noise hits all of them alike."""
    tensors, group = agent.engine.tensors, agent.xfer
    staged: dict[str, list] = {"engine": [], "engine_wide": []}
    runs = {"engine": engine_run(agent, agent.engine, layer, new_row, staged["engine"]),
            "engine_wide": engine_run(agent, wide, layer, new_row, staged["engine_wide"]),
            "raw": raw_run(moves, agent.rank, tensors, layer, group, pack=False),
            "raw_packed": raw_run(moves, agent.rank, tensors, layer, group, pack=True)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, fn in runs.items():
            seconds = timed(group, fn)
            best[name] = min(best[name], staged[name][-1].transfer_s if name in staged else seconds)
    last = min(staged["engine"], key=lambda s: s.transfer_s)
    return {**best, "bytes": last.bytes_recv, "verify_s": last.verify_s, "batches": last.batches,
            "batches_wide": staged["engine_wide"][-1].batches}
