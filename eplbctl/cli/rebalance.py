"""``eplbctl rebalance``: preview, confirm, start and follow a redeployment of chosen layers.

Order of events, so that a mistake never changes anything:
1. the layer spec's syntax and the ``--param`` values (against the local registry) are checked before
   any request; then hello (for L) and the range check: a bad spec or param is a usage error (2);
   with ``--auto``, a status request first: no layer above the threshold -> say so, exit 0, no job;
2. without ``--yes``: stdin must be a terminal (else exit 1, nothing sent), a dry run is shown and the
   operator confirms (no/EOF -> exit 1, nothing changed);
3. the real request: after a preview, the previewed plan by its ``plan_id``, which the daemon applies
   as planned or refuses when a layer of it changed since (then: preview again, nothing moved); with
   ``--yes``, a fresh plan; with ``--wait`` (default) the job is polled with a progress bar on stderr until
   it is done / failed / nochange, then measured imbalance before/after is printed per layer.
A preview the daemon marks ``refused`` (it could not run: too few staging slots) is shown with the
reason and never applied (exit 65). ``--plan-id ID`` applies a preview made earlier (``--dry-run
--json`` prints its id), after the same confirmation, with nothing else on the command line.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eplbctl.cli.base import (
    EXIT_DATAERR,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    CliContext,
    CliError,
    UnexpectedReply,
    check_layer_syntax,
    check_params,
    complete_policy,
    field,
    finite_or_none,
    handle_errors,
    json_option,
    param_option,
    parse_layer_spec,
    parse_params,
    pass_ctx,
)
from eplbctl.cli.output import Terminal, fmt_bytes, fmt_ratio, fmt_summary

FINAL_STATES = ("done", "failed", "nochange")
SETTLE_DEADLINE_S = 60.0
WAIT_DEADLINE_S = 600.0  # overall limit on --wait; the job itself goes on in the daemon
POLL_INTERVAL_S = 0.2


def plan_table(plan: dict[str, Any], model_layers: list[int] | None = None) -> Table:
    """PlanReport per layer: predicted imbalance before/after, moves, bytes; ``model_layers`` offline."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    names = ["layer", "before", "after", "moves", "bytes", "change"]
    if model_layers is not None:
        names.insert(1, "model layer")
    for name in names:
        table.add_column(name, justify="left" if name == "layer" else "right")
    for row in field(plan, "layers"):
        layer = int(field(row, "layer"))
        model = [str(model_layers[layer])] if model_layers is not None else []
        table.add_row(
            str(layer),
            *model,
            fmt_ratio(field(row, "before")),
            fmt_ratio(field(row, "after")),
            str(field(row, "moves")),
            fmt_bytes(field(row, "bytes")),
            "yes" if row.get("change") else "no",
        )
    return table


def plan_totals(plan: dict[str, Any]) -> str:
    summary = field(plan, "summary")
    changed = sum(1 for row in field(plan, "layers") if row.get("change"))
    return (
        f"policy {plan.get('policy', '-')} ({plan.get('mode', '-')}, "
        f"{float(plan.get('seconds', 0.0)):.3f} s): {changed} of {len(plan['layers'])} layers change, "
        f"{summary.get('moves', 0)} moves, {fmt_bytes(summary.get('bytes', 0))}; predicted imbalance "
        f"{fmt_summary('before', summary.get('before'))} -> {fmt_summary('after', summary.get('after'))}"
    )


def show_plan(term: Terminal, plan: dict[str, Any], model_layers: list[int] | None = None) -> None:
    term.table(plan_table(plan, model_layers))
    term.line(plan_totals(plan))


def _by_layer(values: Any) -> dict[int, float]:
    # msgpack may hand int map keys back as str (strict_map_key); normalise to int.
    if not isinstance(values, dict):
        return {}
    return {int(k): float(v) for k, v in values.items() if isinstance(v, int | float)}   # None: no tokens


def result_table(job: dict[str, Any]) -> Table:
    before = _by_layer(job.get("measured_before"))
    after = _by_layer(job.get("measured_after"))
    done = set(job.get("done_layers") or [])
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("layer", "measured before", "measured after", "moved"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for layer in job.get("layers") or []:
        table.add_row(str(layer), fmt_ratio(before.get(layer)), fmt_ratio(after.get(layer)),
                      "yes" if layer in done else "no")
    return table


def request_content(layers: list[int] | None, auto: bool, threshold: float | None, policy: str | None,
                    params: dict[str, str], dry_run: bool, min_gain: float | None = None) -> dict[str, Any]:
    content = {"layers": layers, "auto": auto, "threshold": threshold, "policy": policy,
               "params": params, "dry_run": dry_run}
    if min_gain is not None:
        content["min_gain"] = min_gain
    return content


def wait_for_job(obj: CliContext, term: Terminal, job: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Poll job_request until a final state; progress (layers moved) on stderr unless ``quiet``."""
    deadline = time.monotonic() + WAIT_DEADLINE_S
    job_id = field(job, "job_id")
    total = max(len(job.get("layers") or []), 1)
    # Off a terminal (a log, a pipe) no bar: rich would still write a blank line when it stops.
    progress = Progress(TextColumn("job {task.fields[job_id]}: {task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(),
                        console=term.err, transient=True, disable=quiet or not term.err.is_terminal)
    try:
        with progress:
            return _follow(obj, job, job_id, total, deadline, progress)
    except KeyboardInterrupt:
        raise CliError(f"interrupted; job {job_id} keeps running in the daemon (follow it with "
                       "'eplbctl status')", EXIT_INTERRUPTED) from None


def _follow(obj: CliContext, job: dict[str, Any], job_id: Any, total: int, deadline: float,
            progress: Progress) -> dict[str, Any]:
    task = progress.add_task(str(job.get("state")), total=total, job_id=job_id)
    while job.get("state") not in FINAL_STATES:
        if time.monotonic() > deadline:
            raise CliError(f"job {job_id} still {job.get('state')} after {WAIT_DEADLINE_S:.0f} s; "
                           "it goes on in the daemon (follow it with 'eplbctl status')", EXIT_FAILURE)
        time.sleep(POLL_INTERVAL_S)
        job = field(obj.request("job", {"job_id": job_id}), "job")
        progress.update(task, description=str(job.get("state")),
                        completed=len(job.get("done_layers") or []))
    # The daemon reports measured imbalance once a few control ticks ran on the new placement.
    settle = time.monotonic() + SETTLE_DEADLINE_S
    while job.get("state") == "done" and job.get("measured_after") is None and time.monotonic() < settle:
        progress.update(task, description="measuring")
        time.sleep(POLL_INTERVAL_S)
        job = field(obj.request("job", {"job_id": job_id}), "job")
    return job


@click.command()
@click.option("--layers", "spec", metavar="SPEC", help="MoE layers to rebalance, e.g. 3,7-9.")
@click.option("--auto", is_flag=True,
              help="Let the daemon pick the layers whose imbalance exceeds the threshold.")
@click.option("--threshold", type=click.FloatRange(min=1.0), metavar="X", callback=finite_or_none,
              help="Imbalance above which a layer is worth changing (default: the daemon's).")
@click.option("--policy", metavar="NAME", shell_complete=complete_policy,
              help="Placement policy (see 'eplbctl policy list').")
@param_option
@click.option("--min-gain", type=click.FloatRange(min=0.0), metavar="G", callback=finite_or_none,
              help="Move a layer only if its predicted imbalance drops by more than G (default: the daemon's).")
@click.option("--dry-run", is_flag=True, help="Only show the plan; change nothing.")
@click.option("--plan-id", metavar="ID", help="Apply a plan previewed earlier (its id: --dry-run --json).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the job until it ends.")
@json_option
@pass_ctx
@handle_errors
def rebalance(obj: CliContext, spec: str | None, auto: bool, threshold: float | None, policy: str | None,
              params: tuple[str, ...], min_gain: float | None, dry_run: bool, plan_id: str | None, yes: bool,
              wait: bool, as_json: bool) -> None:
    """Redeploy experts of chosen layers (--layers SPEC), of the worst ones (--auto), or as a plan
    previewed earlier (--plan-id)."""
    if (spec is not None) + auto + (plan_id is not None) != 1:
        raise click.UsageError("give exactly one of --layers SPEC, --auto or --plan-id ID")
    if plan_id is not None:
        given = [name for name, value in (("--policy", policy is not None), ("--param", bool(params)),
                                          ("--threshold", threshold is not None),
                                          ("--min-gain", min_gain is not None), ("--dry-run", dry_run)) if value]
        if given:
            raise click.UsageError(f"--plan-id applies the plan as previewed: drop {', '.join(given)}")
        _apply_saved(obj, plan_id, yes, wait, as_json)
        return
    param_dict = parse_params(params)
    if spec is not None:
        check_layer_syntax(spec)  # before any request: a typo never waits on (or for) a daemon
    if policy is not None:
        check_params(policy, param_dict)
    term = Terminal()
    status = obj.request("status", {"layers": None}) if auto or (param_dict and policy is None) else None
    if policy is None and status is not None and isinstance(status.get("policy"), str):
        check_params(status["policy"], param_dict)  # the daemon's current policy gets the params
    layers = parse_layer_spec(spec, obj.hello()["layers"]) if spec is not None else None
    if auto and status is not None and _nothing_above(term, status, threshold, as_json):
        return
    if not (dry_run or yes or stdin_is_tty()):
        raise CliError("no terminal to confirm on (stdin is not a tty); nothing was changed: preview with "
                       "--dry-run, apply with --yes", EXIT_FAILURE)

    if dry_run or not yes:
        plan = field(obj.request("rebalance", request_content(layers, auto, threshold, policy, param_dict,
                                                              dry_run=True, min_gain=min_gain)), "plan")
        refused = plan.get("refused")
        if dry_run:
            if as_json:
                term.json({"plan": plan})
            else:
                show_plan(term, plan)
            if isinstance(refused, str):
                term.note(f"this plan cannot be applied: {refused}")
            return
        # The preview is for the person who must confirm: stderr when stdout is kept for JSON.
        if as_json:
            term.err.print(plan_table(plan))
            term.note(plan_totals(plan))
        else:
            show_plan(term, plan)
        if not any(row.get("change") for row in plan["layers"]):
            _finish_nochange(term, as_json, "the plan changes no layer; nothing to do")
            return
        if isinstance(refused, str):
            raise CliError(f"this plan cannot be applied: {refused}; nothing was changed", EXIT_DATAERR)
        plan_id = field(plan, "plan_id")  # before the prompt: without it the confirmed plan cannot be applied
        if not isinstance(plan_id, str):
            raise UnexpectedReply("unexpected reply from the daemon: 'plan_id' is not a string")
        if not _confirm(f"Apply this plan to {sum(1 for r in plan['layers'] if r.get('change'))} layer(s)?"):
            raise CliError("aborted; nothing was changed", EXIT_FAILURE)
        job = _apply_preview(obj, plan_id)
    else:
        job = field(obj.request("rebalance", request_content(layers, auto, threshold, policy, param_dict,
                                                             dry_run=False, min_gain=min_gain)), "job")
    _track(obj, term, job, wait, as_json, show_job_plan=yes and not as_json)


def _track(obj: CliContext, term: Terminal, job: dict[str, Any], wait: bool, as_json: bool,
           show_job_plan: bool) -> None:
    """A queued job: say how to follow it (--no-wait), or follow it to its end and report."""
    if not wait:
        if as_json:
            term.json({"job": job})
        else:
            term.line(f"job {field(job, 'job_id')} {job.get('state')}; follow it with 'eplbctl status'")
        return
    job = wait_for_job(obj, term, job, quiet=False)
    report_job(term, job, as_json, show_job_plan=show_job_plan)


def _apply_saved(obj: CliContext, plan_id: str, yes: bool, wait: bool, as_json: bool) -> None:
    """--plan-id: the operator saw this plan earlier (--dry-run); the daemon applies exactly it, or
    refuses when it expired or one of its layers changed since."""
    if not (yes or stdin_is_tty()):
        raise CliError("no terminal to confirm on (stdin is not a tty); nothing was changed: apply with --yes",
                       EXIT_FAILURE)
    if not yes and not _confirm(f"Apply previewed plan {plan_id}?"):
        raise CliError("aborted; nothing was changed", EXIT_FAILURE)
    _track(obj, Terminal(), _apply_preview(obj, plan_id), wait, as_json, show_job_plan=not as_json)


def _apply_preview(obj: CliContext, plan_id: str) -> dict[str, Any]:
    """Apply the plan the operator confirmed, by its id: the daemon never re-plans on newer heat."""
    from eplbctl.client import DaemonError

    def send(client: Any) -> dict[str, Any]:
        try:
            return client.request("rebalance", {"plan_id": plan_id, "dry_run": False})
        except DaemonError as exc:
            if exc.content.get("plan_stale"):
                raise CliError(f"the previewed plan cannot be applied: {exc}; preview again (nothing was changed)",
                               exc.exit_code) from None
            raise

    return field(obj.call(send), "job")


def stdin_is_tty() -> bool:
    """Whether a person can answer the prompt (a pipe's "y" must not apply a plan); tests patch this."""
    return bool(getattr(sys.stdin, "isatty", lambda: False)())


def _nothing_above(term: Terminal, status: dict[str, Any], threshold: float | None, as_json: bool) -> bool:
    """--auto: when no layer's measured imbalance exceeds the threshold, say so (exit 0, no job)."""
    limit = threshold if threshold is not None else status.get("threshold")
    rows = status.get("layers")
    if not isinstance(limit, int | float) or not isinstance(rows, list):
        return False  # let the daemon decide
    measured = [float(r["measured"]) for r in rows if isinstance(r, dict) and isinstance(r.get("measured"),
                                                                                        int | float)]
    if not measured or max(measured) > limit:
        return False
    _finish_nochange(term, as_json, f"no layer above threshold {limit:g} (max imbalance {max(measured):.3f})")
    return True


def _confirm(question: str) -> bool:
    try:
        return click.confirm(question, default=False, err=True)
    except click.Abort:  # EOF on stdin (no terminal) or Ctrl-C at the prompt: treat as "no"
        click.echo(err=True)
        return False


def _finish_nochange(term: Terminal, as_json: bool, message: str) -> None:
    if as_json:
        term.json({"job": None, "message": message})
    else:
        term.line(message)


def _steps(job: dict[str, Any]) -> str:
    """' (steps 49-55)', ' (from step 49)' while the end is unknown (a failed job), '' without a start."""
    start, end = job.get("started_step"), job.get("finished_step")
    if start is None:
        return ""
    return f" (from step {start})" if end is None else f" (steps {start}-{end})"


def report_job(term: Terminal, job: dict[str, Any], as_json: bool, show_job_plan: bool) -> None:
    # With --yes no preview was shown, so the job's plan is printed with the result.
    state = job.get("state")
    if as_json:
        term.json({"job": job})
    elif state == "nochange":
        reason = job.get("error") or "the policy found nothing worth moving"
        term.line(f"job {job['job_id']}: no change ({reason})")
    else:
        if show_job_plan and isinstance(job.get("plan"), dict):
            try:
                show_plan(term, job["plan"])
            except UnexpectedReply:
                pass  # the plan is informative here; the measured result below is what matters
        term.table(result_table(job))
        term.line(f"job {job['job_id']} {state}: {len(job.get('done_layers') or [])} of "
                  f"{len(job.get('layers') or [])} layers moved{_steps(job)}")
    if state == "failed":
        raise CliError(f"job {job['job_id']} failed: {job.get('error') or 'no reason given'}", EXIT_FAILURE)

