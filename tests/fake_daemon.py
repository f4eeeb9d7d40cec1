"""A protocol-shaped stand-in for eplbd, for CLI tests: small handlers on a real ControlServer.

Used in-process by tests/test_cli.py's fixture, and as a script (``python tests/fake_daemon.py
ENDPOINT [--bad-verify]``) standing in for ``eplbd sim`` in the demo tests. It tests the CLI, not the
daemon: the real daemon's integration tests live elsewhere.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from eplbd.server import ControlServer

from eplbctl.protocol import RequestError

LAYERS, RANKS, EXPERTS, SLOTS = 8, 4, 16, 5
INFO = {"ranks": RANKS, "layers": LAYERS, "experts": EXPERTS, "slots_per_device": SLOTS}
# Measured imbalance per layer: layer 5 worst, then 2, then 7.
MEASURED = [1.10, 1.20, 1.90, 1.05, 1.30, 2.50, 1.15, 1.60]


def layer_row(layer: int) -> dict[str, Any]:
    return {"layer": layer, "model_layer": layer + 3, "measured": MEASURED[layer],
            "current": MEASURED[layer] - 0.01, "predicted": 1.02, "replicated": 4, "max_replicas": 2,
            "last_change_step": None if layer != 1 else 40, "window_tokens": 8192}


class FakeDaemon:
    """Handlers keyed by base request name; records every request it gets in ``calls``."""

    def __init__(self, fail_job: bool = False, bad_verify: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_job = fail_job
        self.bad_verify = bad_verify
        self.polls = 0
        self.job_layers: list[int] = []
        self.previewed: list[int] = []
        self.transfer_upper_bound = False  # True: a gloo deployment (P2P ops give no completion time)
        self.stopped = threading.Event()

    def handlers(self) -> dict[str, Any]:
        names = ("status", "rebalance", "job", "profile", "verify", "shutdown")
        return {name: self._recorder(name, getattr(self, name)) for name in names}

    def _recorder(self, name: str, func: Any) -> Any:
        def handle(content: dict[str, Any]) -> dict[str, Any]:
            self.calls.append((name, content))
            return func(content)

        return handle

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def status(self, content: dict[str, Any]) -> dict[str, Any]:
        layers = content.get("layers")
        rows = [layer_row(i) for i in (range(LAYERS) if layers is None else layers)]
        return {"step": 120, "steps_recorded": 100, "tokens_per_step": 4096, "window_steps": 64,
                "ranks": RANKS, "experts": EXPERTS, "slots_per_device": SLOTS, "policy": "default",
                "threshold": 1.1, "transfer": "idle", "job": None, "fault": None,
                "summary": {"measured": {"mean": 1.475, "p90": 2.08, "max": 2.5},
                            "predicted": {"mean": 1.02, "p90": 1.02, "max": 1.02}},
                "layers": rows}

    def plan(self, layers: list[int]) -> dict[str, Any]:
        rows = [{"layer": i, "before": MEASURED[i], "after": 1.02, "moves": 3, "bytes": 3 * 1024 * 1024,
                 "change": True} for i in layers]
        return {"policy": "default", "mode": "global", "seconds": 0.01, "layers": rows,
                "summary": {"before": {"mean": 1.5, "p90": 2.0, "max": 2.5},
                            "after": {"mean": 1.02, "p90": 1.02, "max": 1.02},
                            "moves": 3 * len(rows), "bytes": 3 * 1024 * 1024 * len(rows)}}

    def rebalance(self, content: dict[str, Any]) -> dict[str, Any]:
        if content.get("policy") not in (None, "default"):
            raise RequestError(422, f"unknown policy {content['policy']!r} (valid: default)")
        layers = content["layers"] if content.get("layers") is not None else [2, 5]
        if content.get("dry_run"):
            self.previewed = list(layers)
            return {"plan": {**self.plan(layers), "plan_id": "p1"}}
        if content.get("plan_id") is not None:  # the confirmed preview, as the real daemon applies it
            layers = self.previewed
        self.job_layers = list(layers)
        self.polls = 0
        return {"job": self.job_report("queued", [])}

    def job_report(self, state: str, done: list[int]) -> dict[str, Any]:
        finished = state in ("done", "failed")
        return {"job_id": 1, "state": state, "layers": self.job_layers, "done_layers": done,
                "error": "rank 2 died" if state == "failed" else None, "plan": self.plan(self.job_layers),
                # str keys on purpose: the CLI must accept both int and str layer keys
                "measured_before": {str(i): MEASURED[i] for i in self.job_layers},
                "measured_after": {str(i): 1.03 for i in self.job_layers} if finished else None,
                "started_step": 121, "finished_step": 125 if finished else None}

    def job(self, content: dict[str, Any]) -> dict[str, Any]:
        # Two polls in progress, then the final state.
        self.polls += 1
        if self.polls < 3:
            return {"job": self.job_report("transferring", self.job_layers[: self.polls - 1])}
        if self.fail_job:
            return {"job": self.job_report("failed", self.job_layers[:1])}
        return {"job": self.job_report("done", list(self.job_layers))}

    def profile(self, content: dict[str, Any]) -> dict[str, Any]:
        record = {"job_id": 1, "layers": [2, 5],
                  "phases": {"gather_s": 0.001, "policy_s": 0.02, "plan_s": 0.003, "commit_s": 0.0005,
                             "stall_s": 0.0, "total_s": 0.05},
                  "per_layer": [{"layer": 2, "bytes": 3145728, "transfer_s": 0.004, "gbps": 0.786,
                                 "transfer_upper_bound": self.transfer_upper_bound,
                                 "stall_s": 0.0, "commit_s": 0.0002}]}
        return {"records": [record][: content.get("last", 10)],
                "memory": {"staging_bytes": 1048576, "expert_bytes_per_rank": 83886080,
                           "layer_expert_bytes_per_rank": 10485760}}

    def verify(self, content: dict[str, Any]) -> dict[str, Any]:
        current = "ffff" if self.bad_verify else "abcd"
        return {"baseline": "abcd", "current": current, "step": 130, "ok": not self.bad_verify}

    def shutdown(self, content: dict[str, Any]) -> dict[str, Any]:
        self.stopped.set()
        return {}


def serve(endpoint: str, daemon: FakeDaemon) -> ControlServer:
    server = ControlServer(endpoint, daemon.handlers(), info=dict(INFO))
    server.start()
    return server


def main(argv: list[str]) -> int:
    """Script mode for the demo tests: behave like ``eplbd sim`` on the command line's --endpoint."""
    endpoint = argv[argv.index("--endpoint") + 1]
    daemon = FakeDaemon(bad_verify="--bad-verify" in argv)
    server = serve(endpoint, daemon)
    print(f"eplbd: serving on {server.bound_endpoint}", flush=True)
    try:
        daemon.stopped.wait(60)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
