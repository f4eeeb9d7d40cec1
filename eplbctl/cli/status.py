"""``eplbctl status``: per-layer measured and predicted imbalance of the running deployment.

Exit codes follow LSB's status convention: 0 running, 3 not running, 4 state unknown
(an error reply or a reply that lacks what the protocol promises).
"""

from __future__ import annotations

import time
from typing import Any

import click
from rich.table import Table

from eplbctl.cli.base import (
    EXIT_NOT_RUNNING,
    EXIT_UNKNOWN,
    MAX_COUNT,
    MAX_TIMEOUT_S,
    CliContext,
    CliError,
    UnexpectedReply,
    field,
    finite_or_none,
    handle_errors,
    json_option,
    parse_layer_spec,
    pass_ctx,
    translate,
)
from eplbctl.cli.output import Terminal, fmt_ratio, fmt_summary

LSB = {"not_running": EXIT_NOT_RUNNING, "unknown": EXIT_UNKNOWN}
EXIT_FAULT = 1  # LSB "program is dead": the deployment reports a fault
LAYER_KEYS = ("layer", "model_layer", "measured", "current", "predicted", "replicated", "window_tokens")


def fetch_status(obj: CliContext, layers: list[int] | None) -> dict[str, Any]:
    """One status_request, shape-checked so that a malformed reply is 'unknown' (4), not a traceback."""
    reply = obj.request("status", {"layers": layers}, **LSB)
    try:
        rows = field(reply, "layers")
        if not isinstance(rows, list):
            raise UnexpectedReply("unexpected reply from the daemon: 'layers' is not a list")
        for row in rows:
            for key in LAYER_KEYS:
                field(row, key)
        field(reply, "summary", "measured")
        field(reply, "summary", "predicted")
    except UnexpectedReply as exc:
        raise translate(exc, unknown=EXIT_UNKNOWN) from exc
    return reply


def worst_first(row: dict[str, Any]) -> tuple[float, int]:
    """Sort key: highest measured imbalance first, layers without data ("-") last, ties by layer id."""
    measured = row["measured"]
    return (-float(measured) if isinstance(measured, int | float) else float("inf"), int(row["layer"]))


def select_rows(rows: list[dict[str, Any]], sort: str, top: int | None) -> list[dict[str, Any]]:
    """``--top N`` keeps the N layers with the highest measured imbalance; ``--sort`` orders what is shown."""
    if top is not None:
        rows = sorted(rows, key=worst_first)[:top]
    if sort == "imbalance":
        return sorted(rows, key=worst_first)
    return sorted(rows, key=lambda r: int(r["layer"]))


def status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=None, box=None, header_style="bold", pad_edge=False)
    for name in ("layer", "model layer", "measured", "current", "predicted", "replicated",
                 "last change", "window tokens"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for row in rows:
        last = row.get("last_change_step")
        replicated = f"{row['replicated']}"
        if isinstance(row.get("max_replicas"), int):
            replicated += f" (max {row['max_replicas']}x)"
        table.add_row(
            str(row["layer"]),
            str(row["model_layer"]),
            fmt_ratio(row["measured"]),
            fmt_ratio(row["current"]),
            fmt_ratio(row["predicted"]),
            replicated,
            "-" if last is None else f"step {last}",
            str(row["window_tokens"]),
        )
    return table


def summary_lines(reply: dict[str, Any]) -> list[str]:
    summary = reply["summary"]
    fault = reply.get("fault")
    job = reply.get("job")
    job_text = f", job {job.get('job_id')} {job.get('state')}" if isinstance(job, dict) else ""
    return [
        f"imbalance (max/mean device load): {fmt_summary('measured', summary['measured'])}; "
        f"{fmt_summary('predicted if rebalanced', summary['predicted'])}",
        f"step {reply.get('step', '-')}, steps recorded {reply.get('steps_recorded', '-')} "
        f"(window {reply.get('window_steps', '-')}), tokens/step {reply.get('tokens_per_step', '-')}, "
        f"policy {reply.get('policy', '-')} (threshold {fmt_ratio(reply.get('threshold'))}), "
        f"transfer {reply.get('transfer', '-')}{job_text}, fault {fault if fault else 'none'}",
    ] + [f"event: {e}" for e in (reply.get("events") or [])[-3:] if isinstance(e, str)]


def render(term: Terminal, reply: dict[str, Any], rows: list[dict[str, Any]], as_json: bool,
           stream: bool = False) -> None:
    if as_json:
        body = {k: v for k, v in reply.items() if k != "status"}
        body["layers"] = rows
        term.json(body, compact=stream)
        return
    term.table(status_table(rows))
    for line in summary_lines(reply):
        term.line(line)


@click.command()
@click.option("--layers", "spec", metavar="SPEC", help="MoE layers to show, e.g. 3,7-9 (default: all).")
@click.option("--sort", type=click.Choice(["layer", "imbalance"]), default="layer", show_default=True,
              help="Row order: by layer id, or by measured imbalance (worst first).")
@click.option("--top", type=click.IntRange(min=1, max=MAX_COUNT), metavar="N",
              help="Show only the N layers with the highest measured imbalance.")
@click.option("--watch", type=click.FloatRange(min=0.1, max=MAX_TIMEOUT_S), metavar="SECONDS", callback=finite_or_none,
              help="Refresh every SECONDS until Ctrl-C.")
@click.option("--watch-count", type=click.IntRange(min=1, max=MAX_COUNT), hidden=True,
              help="Stop --watch after this many refreshes (for scripts and tests).")
@json_option
@pass_ctx
@handle_errors
def status(obj: CliContext, spec: str | None, sort: str, top: int | None, watch: float | None,
           watch_count: int | None, as_json: bool) -> None:
    """Per-layer imbalance of the running deployment (exit 3: not running, 4: unknown)."""
    term = Terminal()
    layers = None
    if spec is not None:
        layers = parse_layer_spec(spec, obj.hello(**LSB)["layers"])
    shown = 0
    try:
        while True:
            reply = fetch_status(obj, layers)
            rows = select_rows(list(reply["layers"]), sort, top)
            if watch is not None and not as_json and term.out.is_terminal:
                term.out.clear()
            render(term, reply, rows, as_json, stream=watch is not None)
            shown += 1
            if watch is None or (watch_count is not None and shown >= watch_count):
                if reply.get("fault") and watch is None:
                    raise CliError(f"the deployment has failed: {reply['fault']}", EXIT_FAULT)
                return
            time.sleep(watch)
    except KeyboardInterrupt:
        # Ctrl-C is how one leaves --watch: a normal end, not an error.
        if watch is None:
            raise CliError("interrupted", 130) from None
