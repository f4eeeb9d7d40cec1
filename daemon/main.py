"""`eplbd`: the daemon launcher. `eplbd sim` runs the simulated deployment in the foreground."""

from __future__ import annotations

import math
import sys

import click
from eplbd.faults import FaultSpecError, parse_fault
from eplbd.server import ServerError, take_over_socket
from eplbd.sim import SimConfig

from eplbctl.endpoint import ensure_endpoint_dir, resolve_endpoint


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """EPLB daemon: records expert heat in every worker and serves the eplbctl control socket."""


@main.command()
@click.option("--ranks", default=4, show_default=True, type=click.IntRange(1, 64), help="Worker processes (EP ranks).")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False),
              help="Heat file driving the router (default: bundled DeepSeek-V3 prefill_in1024).")
@click.option("--layers", default="16", show_default=True,
              help="Use the first L MoE layers of the trace, or 'all' (DeepSeek-V3: 58).")
@click.option("--redundant", default=32, show_default=True, type=click.IntRange(0), help="Redundant slots R.")
@click.option("--hidden", default=64, show_default=True, type=click.IntRange(1), help="Hidden size H.")
@click.option("--ffn", default=128, show_default=True, type=click.IntRange(1), help="Expert FFN size F.")
@click.option("--top-k", default=8, show_default=True, type=click.IntRange(1), help="Experts per token.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens per rank per step.")
@click.option("--tick", default=10, show_default=True, type=click.IntRange(1), help="Steps per control tick.")
@click.option("--window", default=20, show_default=True, type=click.IntRange(1), help="Ticks in the heat window.")
@click.option("--layers-per-step", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Layers redeployed per forward step.")
@click.option("--endpoint", envvar="EPLBCTL_ENDPOINT", help="Control endpoint (default: per-user ipc socket).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), help="HMAC key (required for tcp://).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", type=click.IntRange(1), help="Stop after this many steps (default: run until shutdown).")
@click.option("--policy", default="default", show_default=True, help="Placement policy.")
@click.option("--threshold", default=1.1, show_default=True, type=float, help="Imbalance threshold for --auto.")
@click.option("--min-gain", default=0.01, show_default=True, type=float,
              help="Move a layer only when its predicted imbalance improves by more than this.")
@click.option("--comm-timeout", default=30.0, show_default=True, type=float,
              help="Seconds any collective or transfer may wait before the deployment gives up.")
@click.option("--plan-timeout", default=30.0, show_default=True, type=float, help="Seconds a policy may run.")
@click.option("--max-ops", default=64, show_default=True, type=click.IntRange(1),
              help="Expert moves per batch_isend_irecv.")
@click.option("--staging-slots", type=click.IntRange(1), help="Staging buffer in experts (default: one layer's).")
@click.option("--step-sleep", default=0.0, show_default=True, type=float, help="Pause between steps, seconds.")
@click.option("--fault", "faults", multiple=True, help="Inject a fault (see eplbd.faults), repeatable.")
def sim(**opts: object) -> None:
    """Run the simulated deployment: N gloo ranks, real weights, real MoE forward, real transfers."""
    from eplbd.sim import launch

    layers = str(opts.pop("layers"))
    if layers != "all" and not layers.isdigit():
        raise click.BadParameter("must be a positive integer or 'all'", param_hint="--layers")
    for spec in opts["faults"]:
        try:
            parse_fault(spec)
        except FaultSpecError as exc:
            raise click.BadParameter(str(exc), param_hint="--fault") from None
    opts["faults"] = list(opts["faults"])
    cfg = SimConfig(layers=None if layers == "all" else int(layers), **opts)  # type: ignore[arg-type]
    try:
        check_config(cfg)
    except ValueError as exc:
        click.echo(f"eplbd: error: {exc}", err=True)
        sys.exit(65)
    try:   # before any rank starts: a second daemon on a live socket is one line, not tracebacks
        check_endpoint(cfg.endpoint)
    except ServerError as exc:
        click.echo(f"eplbd: error: {exc}", err=True)
        sys.exit(75)
    sys.exit(launch(cfg))


def check_endpoint(endpoint: str | None) -> None:
    """ServerError when a live daemon already serves the ipc endpoint (a stale socket is removed)."""
    resolved = resolve_endpoint(endpoint)
    path = ensure_endpoint_dir(resolved)
    if path is not None:
        take_over_socket(path, resolved)


def check_config(cfg: SimConfig) -> None:
    """Every mistake that would otherwise surface as a crash inside the ranks, said up front."""
    from eplbd.sim import load_trace

    from eplbctl.endpoint import resolve_endpoint
    from eplbctl.placement import slots_per_device

    heat, _, _ = load_trace(cfg)
    experts = heat.shape[-1]
    slots_per_device(experts, cfg.ranks, cfg.redundant)
    if cfg.top_k > experts:
        raise ValueError(f"--top-k {cfg.top_k} exceeds the trace's {experts} experts")
    for name in ("comm_timeout", "plan_timeout", "threshold"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite positive number, got {value}")
    if cfg.threshold < 1.0:
        raise ValueError(f"--threshold is an imbalance (max/mean >= 1.0), got {cfg.threshold}")
    if not math.isfinite(cfg.min_gain) or cfg.min_gain < 0:
        raise ValueError(f"--min-gain must be a finite number >= 0, got {cfg.min_gain}")
    if not math.isfinite(cfg.step_sleep) or cfg.step_sleep < 0:
        raise ValueError(f"--step-sleep must be >= 0, got {cfg.step_sleep}")
    endpoint = resolve_endpoint(cfg.endpoint)
    if endpoint.startswith("tcp://") and not cfg.key_file:
        raise ValueError(f"{endpoint}: a tcp:// control endpoint needs --key-file (an HMAC key)")


if __name__ == "__main__":
    main()
