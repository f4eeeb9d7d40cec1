"""The simulated deployment: N worker processes joined by torch.distributed (gloo), each holding real
expert weights for L MoE layers and running a real MoE forward every step, with the EPLB agent
injected the way it is injected into an inference worker. Rank 0 also hosts the control server.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

log = logging.getLogger("eplbd.sim")


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


def short_error(exc: BaseException) -> str:
    """One readable line from a collective's error (gloo prefixes a source path and adds a pep talk)."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0].strip() or type(exc).__name__


def worker(rank: int, cfg: SimConfig, store_path: str, stop: Any, deaths: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the launcher owns Ctrl-C and stops us in order
    _bind_to_launcher(rank)
    _setup_logging(rank)
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
    code = _serve(agent, model, cfg, rank, control, server, stop, deaths)
    if planner is not None:
        planner.close()
    if server is not None:
        server.stop()
    sys.stdout.flush()
    os._exit(code)   # skip destroy_process_group: it can block on a peer that is already gone


def _coordinator(cfg: SimConfig, shape: Any, store: Any, layer_ids: list[int], faults: Any,
                 agent_cfg: Any) -> tuple[Any, Any, Any]:
    from eplbd.control import Control
    from eplbd.planner import Planner
    from eplbd.server import ControlServer

    from eplbctl.endpoint import resolve_endpoint
    from eplbctl.policies.base import Topology

    planner = Planner(cfg.plan_timeout)
    planner.start()
    memory = {"expert_bytes_per_rank": store.nbytes,
              "layer_expert_bytes_per_rank": shape.slots * shape.expert_bytes,
              "staging_bytes": 0}
    control = Control(Topology(shape.num_ranks, shape.slots), shape.num_experts, cfg.window,
                      shape.num_ranks * shape.tokens, agent_cfg.layers_per_step, shape.expert_bytes,
                      memory, planner, cfg.policy, cfg.threshold, faults, layer_ids, cfg.staging_slots,
                      cfg.min_gain)
    key = open(cfg.key_file, "rb").read().strip() if cfg.key_file else None
    info = {"daemon": "eplbd sim", "ranks": shape.num_ranks, "layers": shape.num_layers,
            "experts": shape.num_experts, "slots_per_device": shape.slots, "model_layers": layer_ids}
    server = ControlServer(resolve_endpoint(cfg.endpoint), control.handlers(), key=key, info=info)
    server.start()
    return control, server, planner


def _serve(agent: Any, model: Any, cfg: SimConfig, rank: int, control: Any, server: Any, stop: Any,
           deaths: Any) -> int:
    announced = False
    try:
        for step in agent.steps():
            model.forward(step, agent.recorder)
            if control is not None:
                if not announced and control._snapshot is not None:
                    print(f"eplbd: serving on {server.bound_endpoint}", flush=True)
                    announced = True
                if stop.is_set() and not control.shutdown.is_set():
                    control.request_shutdown({})
            if cfg.steps is not None and step + 1 >= cfg.steps:
                break
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
        return 0
    except Exception as exc:  # a dead or hung peer, or a broken collective: report, never hang
        message = f"rank {rank} stopped at step {agent.step}: {short_error(exc)}"
        log.error("%s", message)
        if control is None:
            return 1
        notices = _read_deaths(deaths, [], wait_s=3.0)
        stopped = f"the deployment stopped at step {agent.step} (rank 0: {short_error(exc)})"
        if notices:
            message = f"{_cause(notices)}; {stopped}"
        control.set_fault(message)
        if not announced:
            print(f"eplbd: serving on {server.bound_endpoint} (failed: {message})", flush=True)
        if cfg.steps is not None:   # a bounded run ends here; a served one waits for the operator
            return 1
        # keep answering status (with the fault) until told to stop; a hung rank is named once the
        # launcher gives up on it, which is after the others have already reported
        while not control.shutdown.is_set() and not stop.is_set():
            before = len(notices)
            _read_deaths(deaths, notices, wait_s=0.1)
            if len(notices) > before:
                control.update_fault(f"{_cause(notices)}; {stopped}")
        return 1


def _read_deaths(deaths: Any, notices: list[str], wait_s: float) -> list[str]:
    """Append what the launcher reported about exited ranks within `wait_s` (stop early on a cause)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            notices.append(deaths.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
        if any(_is_cause(n) for n in notices):
            break
    return notices


def _is_cause(notice: str) -> bool:
    # A rank that lost a peer exits with code 1 after it, so a signal, another code or a hang is the cause.
    return not notice.endswith("exited with code 1")


def _cause(notices: list[str]) -> str:
    return "; ".join([n for n in notices if _is_cause(n)] or notices)


def _exit_text(rank: int, code: int) -> str:
    if code < 0:
        try:
            return f"rank {rank} died (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"rank {rank} died (signal {-code})"
    return f"rank {rank} exited with code {code}"


def launch(cfg: SimConfig) -> int:
    """Run the deployment in the foreground until shutdown; return rank 0's exit code."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    deaths = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="eplbd-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=worker, args=(r, cfg, store_path, stop, deaths), name=f"eplbd-rank{r}")
                 for r in range(cfg.ranks)]
        for p in procs:
            p.start()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        deadline = None
        first_failure = None
        reported: set[int] = set()
        while procs[0].is_alive():
            for rank, p in enumerate(procs[1:], start=1):
                code = p.exitcode             # polling also reaps it: no zombies
                if code not in (None, 0) and rank not in reported and not stop.is_set():
                    reported.add(rank)
                    first_failure = first_failure or time.monotonic()
                    text = _exit_text(rank, code)
                    log.error("%s", text)
                    deaths.put(text)
            # Ranks still alive well after their peers gave up on a collective are hung: name and stop them.
            if first_failure is not None and time.monotonic() > first_failure + cfg.comm_timeout + 5:
                for rank, p in enumerate(procs[1:], start=1):
                    if p.is_alive() and rank not in reported:
                        reported.add(rank)
                        p.kill()
                        text = f"rank {rank} stopped answering (hung); the launcher killed it"
                        log.error("%s", text)
                        deaths.put(text)
            if stop.is_set() and deadline is None:
                deadline = time.monotonic() + 15
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
        grace = time.monotonic() + 10
        for p in procs:
            p.join(timeout=max(0.0, grace - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        code = procs[0].exitcode
        return 1 if code is None else (code if code >= 0 else 128 - code)
