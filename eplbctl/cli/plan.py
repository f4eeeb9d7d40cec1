"""``eplbctl plan``: offline planning on a heat file, no daemon: what would a policy gain, at what cost.

Exit codes: 2 for a bad command line (including slot arithmetic that cannot work and unknown policies),
65 (EX_DATAERR) for a heat or map file that holds bad data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from eplbctl.cli.base import (
    EXIT_DATAERR,
    EXIT_USAGE,
    CliError,
    check_layer_syntax,
    complete_policy,
    finite_or_none,
    handle_errors,
    json_option,
    param_option,
    parse_layer_spec,
    parse_params,
)
from eplbctl.cli.output import Terminal


def _slots(num_experts: int, devices: int, redundant: int | None, slots: int | None) -> int:
    from eplbctl.placement import PlacementError, slots_per_device

    try:
        if redundant is not None:
            slots = slots_per_device(num_experts, devices, redundant)
    except PlacementError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    assert slots is not None  # guaranteed by the option check in the command
    if devices * slots < num_experts:
        smallest = -(-num_experts // devices)
        raise CliError(f"{devices} devices x {slots} slots cannot hold {num_experts} experts; "
                       f"use --slots-per-device {smallest} or more", EXIT_USAGE)
    if slots > num_experts:  # a device would need two replicas of one expert
        raise CliError(f"S={slots} slots per device exceeds E={num_experts} experts: at most "
                       f"{num_experts * (devices - 1)} redundant slots for {devices} devices", EXIT_USAGE)
    return slots


def _current(path: Path | None, num_layers: int, num_experts: int, devices: int, slots: int) -> Any:
    from eplbctl.mapfile import read_map
    from eplbctl.placement import contiguous_placement

    if path is None:
        return contiguous_placement(num_layers, num_experts, devices, slots)
    current = read_map(path, num_devices=devices, num_experts=num_experts)
    if tuple(current.shape) != (num_layers, devices, slots):
        raise CliError(f"{path}: map has shape {tuple(current.shape)} (layers, devices, slots), but the heat "
                       f"and options need {(num_layers, devices, slots)}", EXIT_DATAERR)
    return current


@click.command()
@click.option("--heat", "heat_path", metavar="FILE", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Heat file (SGLang logical_count JSON/.pt, Qwen counts JSON, JSONL, .npz); "
                   "default: the bundled DeepSeek-V3 prefill_in1024 heat.")
@click.option("--current", "current_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="MAP", help="Current placement (ascend or SGLang map); default: contiguous.")
@click.option("--devices", type=click.IntRange(min=1), required=True, metavar="N", help="EP ranks.")
@click.option("--redundant", type=click.IntRange(min=0), metavar="R", help="Redundant slots in all.")
@click.option("--slots-per-device", "slots", type=click.IntRange(min=1), metavar="S",
              help="Slots per device.")
@click.option("--nodes", type=click.IntRange(min=1), metavar="K", help="Nodes (hierarchical, with --groups).")
@click.option("--groups", type=click.IntRange(min=1), metavar="G", help="Expert groups (with --nodes).")
@click.option("--layers", "spec", metavar="SPEC", help="Plan only these MoE layers (default: all).")
@click.option("--policy", "policy_name", default="default", show_default=True, metavar="NAME",
              shell_complete=complete_policy, help="Placement policy (see 'eplbctl policy list').")
@param_option
@click.option("--threshold", type=click.FloatRange(min=0.0), default=0.0, show_default=True, metavar="G",
              callback=finite_or_none, help="Minimum predicted imbalance gain for a layer to change.")
@click.option("--bytes-per-expert", type=click.IntRange(min=0), default=0, show_default=True, metavar="B",
              help="Size of one expert's weights, to report bytes moved.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="MAP",
              help="Write the planned placement to this map file.")
@click.option("--format", "fmt", type=click.Choice(["ascend", "sglang"]), default="ascend", show_default=True,
              help="Format of --out.")
@json_option
@handle_errors
def plan(heat_path: Path | None, current_path: Path | None, devices: int, redundant: int | None, slots: int | None,
         nodes: int | None, groups: int | None, spec: str | None, policy_name: str, params: tuple[str, ...],
         threshold: float, bytes_per_expert: int, out: Path | None, fmt: str, as_json: bool) -> None:
    """Plan a placement offline from a heat file and show predicted imbalance before/after."""
    if (redundant is None) == (slots is None):
        raise click.UsageError("give exactly one of --redundant R or --slots-per-device S")
    if (nodes is None) != (groups is None):
        raise click.UsageError("--nodes and --groups go together (hierarchical placement)")
    param_dict = parse_params(params)
    if spec is not None:
        check_layer_syntax(spec)

    from eplbctl.heat import default_heat_path, load_heat
    from eplbctl.planning import make_plan
    from eplbctl.policies import PolicyError, Topology, get_policy
    from eplbctl.policies.base import check_topology

    try:
        policy = get_policy(policy_name, param_dict)
    except PolicyError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    heat = load_heat(heat_path if heat_path is not None else default_heat_path())
    term = Terminal()
    num_slots = _slots(heat.num_experts, devices, redundant, slots)
    layers = parse_layer_spec(spec, heat.num_layers) if spec is not None else None
    current = _current(current_path, heat.num_layers, heat.num_experts, devices, num_slots)
    topo = Topology(num_devices=devices, slots_per_device=num_slots, num_nodes=nodes, num_groups=groups)
    try:  # nodes/groups that do not divide the devices/experts are a command-line mistake, not bad data
        check_topology(topo, heat.num_experts)
    except PolicyError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    result = make_plan(heat.heat, current, topo, policy, layers=layers, min_gain=threshold,
                       bytes_per_expert=bytes_per_expert)
    for note in heat.notes:  # once the plan exists: a failed command prints only its error
        term.note(f"eplbctl: note: {note}")
    report = result.to_report()
    if out is not None:
        from eplbctl.mapfile import write_map

        write_map(out, result.placement, fmt, num_experts=heat.num_experts)
    if as_json:
        term.json({"plan": report, "heat": {"source": heat.source, "layers": heat.num_layers,
                                            "experts": heat.num_experts, "model_layers": heat.layer_ids},
                   "devices": devices, "slots_per_device": num_slots, "out": str(out) if out else None})
        return

    from eplbctl.cli.rebalance import show_plan

    term.line(f"{heat.source}: {heat.num_layers} MoE layers x {heat.num_experts} experts on {devices} "
              f"devices x {num_slots} slots ({devices * num_slots - heat.num_experts} redundant)")
    show_plan(term, report, model_layers=heat.layer_ids)
    if out is not None:
        term.note(f"wrote {fmt} map to {out}")
