"""The daemon-facing commands through CliRunner against a real ControlServer with fake handlers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fake_daemon import FakeDaemon, layer_row, serve

from eplbctl.cli import main


def run(endpoint: str, *args: str, input: str | None = None) -> Result:
    runner = CliRunner()
    return runner.invoke(main, ["--endpoint", endpoint, "--timeout", "5", *args], input=input,
                         catch_exceptions=False)


# ----------------------------------------------------------------------------- status


def test_status_table_and_summary(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "model", "layer", "measured", "current", "predicted", "replicated",
                                "last", "change", "window", "tokens"]
    assert lines[1].split() == ["0", "3", "1.100", "1.090", "1.020", "4", "(max", "2x)", "-", "8192"]
    assert lines[2].split()[8:10] == ["step", "40"]
    assert len(lines) == 1 + 8 + 2
    assert lines[-2] == ("imbalance (max/mean device load): measured mean 1.475 p90 2.080 max 2.500; "
                         "predicted if rebalanced mean 1.020 p90 1.020 max 1.020")
    assert lines[-1] == ("step 120, steps recorded 100 (window 64), tokens/step 4096, policy default "
                         "(threshold 1.100), transfer idle, fault none")
    assert result.stderr == ""
    assert daemon.names() == ["status"]


def test_status_sort_top_and_layers(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "status", "--sort", "imbalance", "--top", "3")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()[1:4]] == ["5", "2", "7"]
    # --top picks the worst; the default order is by layer
    result = run(endpoint, "status", "--top", "2")
    assert [line.split()[0] for line in result.stdout.splitlines()[1:3]] == ["2", "5"]
    result = run(endpoint, "status", "--layers", "1,3-4")
    assert result.exit_code == 0
    assert daemon.calls[-1] == ("status", {"layers": [1, 3, 4]})
    assert [line.split()[0] for line in result.stdout.splitlines()[1:4]] == ["1", "3", "4"]


def test_layer_with_no_tokens_in_its_window_shows_no_measured_imbalance_and_sorts_last(
        endpoint: str, daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    import fake_daemon

    def row(layer: int) -> dict:
        out = layer_row(layer)
        if layer == 5:                       # the worst layer recorded nothing after a fault
            out.update(measured=None, window_tokens=0)
        return out
    monkeypatch.setattr(fake_daemon, "layer_row", row)
    result = run(endpoint, "status", "--sort", "imbalance")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:9]]
    assert rows[-1][:3] == ["5", "8", "-"] and rows[0][0] == "2"


def test_job_result_with_a_layer_that_has_no_measured_imbalance_shows_a_dash() -> None:
    from rich.console import Console

    from eplbctl.cli.rebalance import result_table

    console = Console(width=100, record=True)
    console.print(result_table({"layers": [0, 1], "done_layers": [0, 1], "measured_before": {"0": 1.3, "1": None},
                                "measured_after": {"0": 1.02, "1": None}}))
    lines = console.export_text().splitlines()
    assert lines[1].split() == ["0", "1.300", "1.020", "yes"] and lines[2].split() == ["1", "-", "-", "yes"]


def test_status_json_is_only_json(endpoint: str) -> None:
    result = run(endpoint, "status", "--json", "--sort", "imbalance", "--top", "1")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert [row["layer"] for row in body["layers"]] == [5]
    assert body["summary"]["measured"]["max"] == 2.5
    assert "status" not in body
    assert result.stderr == ""


def test_status_watch_stream(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "status", "--watch", "0.1", "--watch-count", "2", "--json")
    assert result.exit_code == 0
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 2 and daemon.names() == ["status", "status"]


def test_status_bad_layer_spec_is_usage_error(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "status", "--layers", "6-9")
    assert result.exit_code == 2
    assert result.stderr == "eplbctl: error: layer 9 out of range 0-7\n"
    assert result.stdout == ""
    assert daemon.names() == []  # only hello, which the server answers itself


def test_status_not_running(absent: str) -> None:
    result = run(absent, "status")
    assert result.exit_code == 3
    assert result.stderr == f"eplbctl: error: no eplbd daemon at {absent} (is `eplbd sim` running?)\n"
    assert result.stdout == ""


def test_status_unknown_state(sockdir: Path) -> None:
    class Broken(FakeDaemon):
        def status(self, content: dict) -> dict:
            return {"step": 1}

    server = serve(f"ipc://{sockdir / 'b.sock'}", Broken())
    try:
        result = run(server.bound_endpoint, "status")
    finally:
        server.stop()
    assert result.exit_code == 4
    assert result.stderr == "eplbctl: error: unexpected reply from the daemon: no 'layers'\n"


@pytest.mark.parametrize("args", [["rebalance", "--auto", "--yes"], ["profile"], ["status", "--layers", "1"]])
def test_other_commands_unavailable(absent: str, args: list[str]) -> None:
    result = run(absent, *args)
    expected = 3 if args[0] == "status" else 69
    assert result.exit_code == expected
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("eplbctl: error: no eplbd daemon at ")


# ----------------------------------------------------------------------------- rebalance


class PluginDaemon(FakeDaemon):
    """Runs a plug-in policy this installation does not know: --param goes to the daemon as typed."""

    def status(self, content: dict) -> dict:
        return {**super().status(content), "policy": "plugin"}


def test_rebalance_dry_run(sockdir: Path) -> None:
    # --param is checked locally against the daemon's policy when it is known here (test_cli_errors.py)
    daemon = PluginDaemon()
    server = serve(f"ipc://{sockdir / 'p.sock'}", daemon)
    try:
        result = run(server.bound_endpoint, "rebalance", "--layers", "2,5", "--dry-run", "--param", "x=1")
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "before", "after", "moves", "bytes", "change"]
    assert lines[1].split() == ["2", "1.900", "1.020", "3", "3.00", "MiB", "yes"]
    assert lines[-1] == ("policy default (global, 0.010 s): 2 of 2 layers change, 6 moves, 6.00 MiB; "
                         "predicted imbalance before mean 1.500 p90 2.000 max 2.500 -> "
                         "after mean 1.020 p90 1.020 max 1.020")
    assert daemon.calls[1:] == [("rebalance", {"layers": [2, 5], "auto": False, "threshold": None,
                                               "policy": None, "params": {"x": "1"}, "dry_run": True})]


def test_rebalance_dry_run_json(endpoint: str) -> None:
    result = run(endpoint, "rebalance", "--auto", "--threshold", "1.2", "--dry-run", "--json")
    assert result.exit_code == 0
    assert [row["layer"] for row in json.loads(result.stdout)["plan"]["layers"]] == [2, 5]


@pytest.fixture
def tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt needs a terminal on stdin; CliRunner's stdin is not one."""
    monkeypatch.setattr("eplbctl.cli.rebalance.stdin_is_tty", lambda: True)


def test_rebalance_confirm_no_changes_nothing(endpoint: str, daemon: FakeDaemon, tty: None) -> None:
    result = run(endpoint, "rebalance", "--layers", "5", input="n\n")
    assert result.exit_code == 1
    assert "Apply this plan to 1 layer(s)? [y/N]" in result.stderr
    assert result.stderr.endswith("eplbctl: error: aborted; nothing was changed\n")
    assert [c[1]["dry_run"] for c in daemon.calls] == [True]


def test_rebalance_no_stdin_aborts(endpoint: str, daemon: FakeDaemon, tty: None) -> None:
    result = run(endpoint, "rebalance", "--auto", input="")
    assert result.exit_code == 1
    assert result.stderr.endswith("eplbctl: error: aborted; nothing was changed\n")
    assert daemon.names() == ["status", "rebalance"]


def test_rebalance_confirmed_waits_and_reports(endpoint: str, daemon: FakeDaemon, tty: None) -> None:
    result = run(endpoint, "rebalance", "--layers", "2,5", "--policy", "default", input="y\n")
    assert result.exit_code == 0, result.output
    assert daemon.names() == ["rebalance", "rebalance", "job", "job", "job"]
    assert daemon.calls[1][1]["dry_run"] is False and daemon.calls[2][1] == {"job_id": 1}
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("layer") and "measured" in line))
    assert lines[start].split() == ["layer", "measured", "before", "measured", "after", "moved"]
    assert lines[start + 1].split() == ["2", "1.900", "1.030", "yes"]
    assert lines[-1] == "job 1 done: 2 of 2 layers moved (steps 121-125)"


def test_rebalance_yes_json(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "rebalance", "--layers", "5", "--yes", "--json")
    assert result.exit_code == 0
    assert daemon.names() == ["rebalance", "job", "job", "job"]  # --yes skips the preview
    job = json.loads(result.stdout)["job"]
    assert job["state"] == "done" and job["done_layers"] == [5]


def test_rebalance_no_wait(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "rebalance", "--layers", "5", "--yes", "--no-wait")
    assert result.exit_code == 0
    assert result.stdout == "job 1 queued; follow it with 'eplbctl status'\n"
    assert daemon.names() == ["rebalance"]


def test_rebalance_failed_job(endpoint: str, daemon: FakeDaemon) -> None:
    daemon.fail_job = True
    result = run(endpoint, "rebalance", "--layers", "2,5", "--yes")
    assert result.exit_code == 1
    assert result.stderr.endswith("eplbctl: error: job 1 failed: rank 2 died\n")


def test_rebalance_daemon_rejects_policy(endpoint: str) -> None:
    result = run(endpoint, "rebalance", "--auto", "--policy", "nope", "--dry-run")
    assert result.exit_code == 65
    assert result.stderr == "eplbctl: error: unknown policy 'nope' (valid: default)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "x"],
         "eplbctl: error: bad layer 'x' (expected a number, a range like 7-9, or 'all')\n"),
        (["--layers", "8"], "eplbctl: error: layer 8 out of range 0-7\n"),
    ],
)
def test_rebalance_bad_layer_spec(endpoint: str, daemon: FakeDaemon, args: list[str], message: str) -> None:
    result = run(endpoint, "rebalance", *args, "--yes")
    assert result.exit_code == 2
    assert result.stderr == message
    assert daemon.names() == []  # no rebalance request was sent


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "eplbctl: error: give exactly one of --layers SPEC, --auto or --plan-id ID"),
        (["--auto", "--layers", "1"], "eplbctl: error: give exactly one of --layers SPEC, --auto or --plan-id ID"),
        (["--auto", "--param", "k"], "eplbctl: error: Invalid value for '--param': expected key=value, got 'k'"),
        (["--auto", "--threshold", "0.5"], "eplbctl: error: Invalid value for '--threshold'"),
    ],
)
def test_rebalance_usage_errors(endpoint: str, daemon: FakeDaemon, args: list[str], message: str) -> None:
    result = run(endpoint, "rebalance", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert daemon.names() == []


# ----------------------------------------------------------------------------- profile


def test_profile_table(endpoint: str, daemon: FakeDaemon) -> None:
    result = run(endpoint, "profile", "--last", "3")
    assert result.exit_code == 0
    assert daemon.calls == [("profile", {"last": 3})]
    lines = result.stdout.splitlines()
    assert lines[0] == "per job (ms)"
    assert lines[2].split() == ["1", "2,5", "1.00", "20.00", "3.00", "0.50", "0.00", "50.00"]
    assert lines[3] == "per layer"
    assert lines[5].split() == ["1", "2", "3.00", "MiB", "4.00", "0.786", "0.00", "0.20"]
    assert lines[-1] == ("memory per rank: expert weights 80.00 MiB, one layer 10.00 MiB, "
                         "staging buffers 1.00 MiB")


def test_profile_marks_a_transfer_time_that_is_only_an_upper_bound(endpoint: str, daemon: FakeDaemon) -> None:
    daemon.transfer_upper_bound = True
    lines = run(endpoint, "profile").stdout.splitlines()
    assert lines[5].split() == ["1", "2", "3.00", "MiB", "<=4.00", ">=0.786", "0.00", "0.20"]


def test_profile_json(endpoint: str) -> None:
    result = run(endpoint, "profile", "--json")
    body = json.loads(result.stdout)
    assert body["memory"]["staging_bytes"] == 1048576 and len(body["records"]) == 1
