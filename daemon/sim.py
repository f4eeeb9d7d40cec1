"""The simulated deployment: N worker processes joined by torch.distributed (gloo), each holding real
expert weights for L MoE layers and running a real MoE forward every step, with the EPLB agent
injected the way it is injected into an inference worker. Rank 0 also hosts the control server.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple, NoReturn

import numpy as np
from eplbd.faults import cause_of, is_cause, lost_peer, short_error

log = logging.getLogger("eplbd.sim")

HUNG_GRACE_S = 2.0     # a rank waiting on peers that exited hears of it (connection closed) well within this
CAUSE_WAIT_S = HUNG_GRACE_S + 3.0   # how long rank 0 waits for the launcher to name why a collective failed
RUNNING, GAVE_UP, FAILED = 0, 1, 2  # rank 0's state for the launcher: running, lost a peer, failed by itself
EX_SOFTWARE = 70       # a rank's own error; exit code 1 means it gave up on a peer (a consequence)


@dataclass
class SimConfig:
    ranks: int = 4
    trace: str | None = None          # heat file; default: the bundled DeepSeek-V3 prefill trace
    layers: int | None = 16           # first L MoE layers of the trace; None = all
    redundant: int = 32
    hidden: int = 64
    ffn: int = 128
    top_k: int = 8
    tokens: int = 64                  # tokens per rank per step
    tick: int = 10                    # steps per control tick
    window: int = 20                  # ticks in the heat window
    layers_per_step: int = 1
    endpoint: str | None = None
    key_file: str | None = None
    seed: int = 0
    steps: int | None = None          # stop after this many steps (None: until shutdown)
    policy: str = "default"
    threshold: float = 1.1
    min_gain: float = 0.01            # a layer moves only when its predicted imbalance drops by more
    comm_timeout: float = 30.0
    plan_timeout: float = 30.0
    max_ops: int = 64
    staging_slots: int | None = None
    step_sleep: float = 0.0           # pause between steps (leave CPU to the host on small machines)
    faults: list[str] = field(default_factory=list)


@dataclass
class Links:
    """What the launcher and the ranks share."""
    stop: Any       # Event, launcher -> ranks: shut down in order (Ctrl-C, SIGTERM)
    ready: Any      # Event, rank 0 -> launcher: rank 0 serves, start-up is over
    coord: Any      # shared int, rank 0 -> launcher: RUNNING, GAVE_UP or FAILED
    deaths: Any     # Queue, launcher -> rank 0: ranks that ended or hung, named once
    reports: Any    # Queue, ranks -> launcher: StartFailure


class StartFailure(NamedTuple):
    rank: int
    text: str
    code: int
    cause: bool     # False: the rank only lost a peer that failed first


def load_trace(cfg: SimConfig) -> tuple[np.ndarray, list[int], str]:
    """-> heat [L, E] or [T, L, E], model layer ids, source description."""
    from eplbctl.heat import default_heat_path, load_heat

    data = load_heat(cfg.trace or default_heat_path())
    heat, ids = data.heat, list(data.layer_ids)
    if cfg.layers is not None:
        if not 1 <= cfg.layers <= data.num_layers:
            raise ValueError(f"--layers must be in 1-{data.num_layers} for {data.source}")
        heat = heat[..., :cfg.layers, :]
        ids = ids[:cfg.layers]
    return heat, ids, data.source


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s eplbd[rank {rank}] %(levelname)s %(name)s: %(message)s")


def _bind_to_launcher(rank: int) -> None:
    """Die with the launcher (even on kill -9) and carry a name `pgrep eplbd` finds (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)                       # PR_SET_PDEATHSIG
        libc.prctl(15, f"eplbd-rank{rank}".encode()[:15])   # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def worker(rank: int, cfg: SimConfig, store_path: str, links: Links) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the launcher owns Ctrl-C and stops us in order
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})   # blocked by the launcher while starting us
    _bind_to_launcher(rank)
    _setup_logging(rank)
    try:
        agent, model, control, server, planner = _start(rank, cfg, store_path)
    except Exception as exc:
        _start_failed(rank, exc, links.reports)
    code = _serve(agent, model, cfg, rank, control, server, links)
    if planner is not None:
        planner.close()
    if server is not None:
        server.stop()
    sys.stdout.flush()
    os._exit(code)   # skip destroy_process_group: it can block on a peer that is already gone


def _start(rank: int, cfg: SimConfig, store_path: str) -> tuple[Any, Any, Any, Any, Any]:
    import torch
    import torch.distributed as dist
    from eplbd.agent import Agent, AgentConfig, initial_maps
    from eplbd.faults import Faults
    from eplbd.moe import ExpertStore, MoEShape, Router, SimMoE

    from eplbctl.placement import contiguous_placement, slots_per_device

    torch.set_num_threads(1)
    timeout = timedelta(seconds=cfg.comm_timeout)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=cfg.ranks,
                            timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)   # small group: ticks, commands, votes
    xfer = dist.new_group(backend="gloo", timeout=timeout)   # weight transfers only
    heat, layer_ids, source = load_trace(cfg)
    L, E = heat.shape[-2:]
    S = slots_per_device(E, cfg.ranks, cfg.redundant)
    placement = contiguous_placement(L, E, cfg.ranks, S)
    shape = MoEShape(L, E, cfg.ranks, S, cfg.hidden, cfg.ffn, cfg.top_k, cfg.tokens)
    store = ExpertStore(shape, cfg.seed, torch.device("cpu"))
    store.load(placement[:, rank])
    maps = initial_maps(placement, E, min(cfg.ranks, cfg.redundant + 1))
    model = SimMoE(shape, store, Router(heat, cfg.top_k, cfg.seed), maps, rank)
    faults = Faults.from_specs(cfg.faults)
    control = server = planner = None
    agent_cfg = AgentConfig(cfg.tick, cfg.layers_per_step, cfg.max_ops, cfg.staging_slots, cfg.comm_timeout)
    if rank == 0:
        control, server, planner = _coordinator(cfg, shape, store, layer_ids, faults, agent_cfg)
        log.info("trace %s: %d MoE layers x %d experts, %d ranks x %d slots", source, L, E, cfg.ranks, S)
    agent = Agent(model, placement, rank, cfg.ranks, ctrl, xfer, agent_cfg, control, faults)
    if control is not None:
        control.memory["staging_bytes"] = agent.engine.staging_bytes
    return agent, model, control, server, planner


def _start_failed(rank: int, exc: Exception, reports: Any) -> NoReturn:
    """Tell the launcher why this rank could not start and exit without a traceback: it says it once."""
    from eplbd.server import ServerError

    if os.environ.get("EPLBD_DEBUG"):
        log.exception("rank %d could not start", rank)
    if isinstance(exc, ServerError):   # the endpoint is taken or refused: retry later or elsewhere
        failure = StartFailure(rank, str(exc), 75, True)
    else:
        failure = StartFailure(rank, f"rank {rank} could not start: {short_error(exc)}", 1, not lost_peer(exc))
    reports.put(failure)
    reports.close()
    reports.join_thread()   # in the pipe before this process is gone
    os._exit(failure.code)


def _coordinator(cfg: SimConfig, shape: Any, store: Any, layer_ids: list[int], faults: Any,
                 agent_cfg: Any) -> tuple[Any, Any, Any]:
    from eplbd.control import Control
    from eplbd.planner import Planner
    from eplbd.server import ControlServer

    from eplbctl.endpoint import resolve_endpoint
    from eplbctl.policies.base import Topology
    from eplbctl.signing import read_key

    planner = Planner(cfg.plan_timeout)
    planner.start()
    memory = {"expert_bytes_per_rank": store.nbytes,
              "layer_expert_bytes_per_rank": shape.slots * shape.expert_bytes,
              "staging_bytes": 0}
    control = Control(Topology(shape.num_ranks, shape.slots), shape.num_experts, cfg.window,
                      shape.num_ranks * shape.tokens, agent_cfg.layers_per_step, shape.expert_bytes,
                      memory, planner, cfg.policy, cfg.threshold, faults, layer_ids, cfg.staging_slots,
                      cfg.min_gain)
    key = read_key(cfg.key_file) if cfg.key_file else None   # checked up front by eplbd.main
    info = {"daemon": "eplbd sim", "ranks": shape.num_ranks, "layers": shape.num_layers,
            "experts": shape.num_experts, "slots_per_device": shape.slots, "model_layers": layer_ids}
    server = ControlServer(resolve_endpoint(cfg.endpoint), control.handlers(), key=key, info=info)
    try:
        server.start()
    except BaseException:
        planner.close()
        raise
    return control, server, planner


def _serve(agent: Any, model: Any, cfg: SimConfig, rank: int, control: Any, server: Any, links: Links) -> int:
    announced = False
    try:
        for step in agent.steps():
            model.forward(step, agent.recorder)
            if control is not None:
                if not announced and control._snapshot is not None:
                    print(f"eplbd: serving on {server.bound_endpoint}", flush=True)
                    links.ready.set()
                    announced = True
                if links.stop.is_set() and not control.shutdown.is_set():
                    control.request_shutdown({})
            if cfg.steps is not None and step + 1 >= cfg.steps:
                break
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
        return 0
    except Exception as exc:  # a dead or hung peer, or a broken collective: report, never hang
        peer = lost_peer(exc)
        message = f"rank {rank} stopped at step {agent.step}: {short_error(exc)}"
        log.error("%s", message)
        if control is None:
            return 1 if peer else EX_SOFTWARE
        links.coord.value = GAVE_UP if peer else FAILED
        # Rank 0 only knows a collective failed; the launcher knows which rank died or hung: wait for it,
        # so the job's error names the cause rather than the ranks that gave up after it.
        notices = _read_deaths(links.deaths, [], wait_s=CAUSE_WAIT_S if peer else 0.0)
        stopped = f"the deployment stopped at step {agent.step} (rank 0: {short_error(exc)})"
        if notices:
            message = f"{cause_of(notices)}; {stopped}"
        control.set_fault(message)
        if not announced:
            print(f"eplbd: serving on {server.bound_endpoint} (failed: {message})", flush=True)
            links.ready.set()
        if cfg.steps is not None:   # a bounded run ends here; a served one waits for the operator
            return 1
        # keep answering status (with the fault) until told to stop; a cause named later (several hung
        # ranks are only named after the launcher's long wait) still replaces the account
        while not control.shutdown.is_set() and not links.stop.is_set():
            before = len(notices)
            _read_deaths(links.deaths, notices, wait_s=0.1)
            if peer and len(notices) > before:
                control.update_fault(f"{cause_of(notices)}; {stopped}")
        return 1


def _read_deaths(deaths: Any, notices: list[str], wait_s: float) -> list[str]:
    """Append what the launcher reported about exited ranks within `wait_s` (stop early on a cause)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            notices.append(deaths.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
        if any(is_cause(n) for n in notices) or time.monotonic() >= deadline:
            break
    return notices
