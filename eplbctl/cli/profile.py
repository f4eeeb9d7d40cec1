"""``eplbctl profile``: what the last redeployments cost, per phase and per layer, and their memory."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from eplbctl.cli.base import MAX_COUNT, CliContext, UnexpectedReply, field, handle_errors, json_option, pass_ctx
from eplbctl.cli.output import Terminal, fmt_bytes

PHASES = ("gather_s", "policy_s", "plan_s", "commit_s", "stall_s", "total_s")


def _seconds(value: Any) -> str:
    # Milliseconds read better: most phases take 0.1-100 ms.
    return f"{float(value) * 1e3:.2f}" if isinstance(value, int | float) else "-"


def phases_table(records: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title="per job (ms)", title_justify="left")
    table.add_column("job")
    table.add_column("layers")
    for name in PHASES:
        table.add_column(name.removesuffix("_s"), justify="right")
    for rec in records:
        phases = field(rec, "phases")
        table.add_row(str(field(rec, "job_id")), _layers_text(rec.get("layers") or []),
                      *(_seconds(phases.get(name)) for name in PHASES))
    return table


def per_layer_table(records: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title="per layer", title_justify="left")
    for name in ("job", "layer", "bytes", "transfer ms", "GB/s", "stall ms", "commit ms"):
        table.add_column(name, justify="left" if name in ("job", "layer") else "right")
    for rec in records:
        for row in rec.get("per_layer") or []:
            gbps = row.get("gbps")
            # an upper bound on the time (so a lower bound on GB/s) where no completion was seen
            at_most, at_least = ("<=", ">=") if row.get("transfer_upper_bound") else ("", "")
            table.add_row(str(rec["job_id"]), str(field(row, "layer")), fmt_bytes(row.get("bytes")),
                          at_most + _seconds(row.get("transfer_s")),
                          f"{at_least}{gbps:.3f}" if isinstance(gbps, int | float) else "-",
                          _seconds(row.get("stall_s")), _seconds(row.get("commit_s")))
    return table


def _layers_text(layers: list[int]) -> str:
    try:
        from eplbctl.layerspec import format_layers

        return format_layers(layers)
    except (ImportError, ValueError):
        return ",".join(str(x) for x in layers)


def memory_line(memory: dict[str, Any]) -> str:
    return (f"memory per rank: expert weights {fmt_bytes(memory.get('expert_bytes_per_rank'))}, one layer "
            f"{fmt_bytes(memory.get('layer_expert_bytes_per_rank'))}, staging buffers "
            f"{fmt_bytes(memory.get('staging_bytes'))}")


@click.command()
@click.option("--last", type=click.IntRange(min=1, max=MAX_COUNT), default=10, show_default=True, metavar="N",
              help="How many of the most recent jobs to show.")
@json_option
@pass_ctx
@handle_errors
def profile(obj: CliContext, last: int, as_json: bool) -> None:
    """Cost of the last redeployments: phases, per-layer transfers, memory."""
    reply = obj.request("profile", {"last": last})
    records = field(reply, "records")
    memory = field(reply, "memory")
    if not isinstance(records, list) or not isinstance(memory, dict):
        raise UnexpectedReply("unexpected reply from the daemon: 'records' or 'memory' has the wrong type")
    events = reply.get("events") if isinstance(reply.get("events"), list) else []
    term = Terminal()
    if as_json:
        term.json({"records": records, "memory": memory, "events": events})
        return
    if records:
        term.table(phases_table(records))
        if any(rec.get("per_layer") for rec in records):
            term.table(per_layer_table(records))
    else:
        term.line("no redeployment has finished yet")
    term.line(memory_line(memory))
    for event in events[-5:]:   # failed jobs, policy errors and timeouts: why a job cost nothing
        term.line(f"event: {event}")
