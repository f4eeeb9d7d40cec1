"""Error paths of the CLI a review found: exit codes, one-line messages, nothing sent when it must not be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from fake_daemon import FakeDaemon, serve

from eplbctl.cli import main
from eplbctl.cli.base import BUILTIN_POLICIES, CliError, complete_policy
from eplbctl.cli.rebalance import report_job
from eplbctl.endpoint import resolve_endpoint
from eplbctl.heat import HeatError, default_heat_path, validate_heat
from eplbctl.mapfile import MapFileError, read_map
from eplbctl.policies.base import PolicyError

REPO = Path(__file__).resolve().parent.parent
HUGE = "99999999999999999999999"


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def at(endpoint: str, *args: str, input: str | None = None) -> Result:
    return run("--endpoint", endpoint, "--timeout", "5", *args, input=input)


def one_line_error(result: Result, code: int, start: str = "") -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"eplbctl: error: {start}"), result.stderr
    assert "Traceback" not in result.output


def plan(*args: str) -> Result:
    return run("plan", "--heat", str(default_heat_path()), *args)


# 1 ------------------------------------------------------------------------------------------------


def test_auto_with_no_layer_above_threshold_says_so_and_sends_no_job(endpoint: str, daemon: FakeDaemon) -> None:
    result = at(endpoint, "rebalance", "--auto", "--threshold", "99", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout == "no layer above threshold 99 (max imbalance 2.500)\n"
    assert daemon.names() == ["status"]
    result = at(endpoint, "rebalance", "--auto", "--threshold", "99", "--yes", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"job": None,
                                         "message": "no layer above threshold 99 (max imbalance 2.500)"}
    assert "rebalance" not in daemon.names()


# 2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e9", "nan", "0", "-1", "86401"])
def test_timeout_must_be_finite_positive_and_at_most_a_day(absent: str, value: str) -> None:
    result = run("--endpoint", absent, "--timeout", value, "status")
    one_line_error(result, 2, "Invalid value for '--timeout': ")


# 3 ------------------------------------------------------------------------------------------------


def test_deeply_nested_map_is_one_line_bad_data(tmp_path: Path) -> None:
    nested = tmp_path / "n.json"
    nested.write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(MapFileError, match="nested too deeply to be an expert map"):
        read_map(nested)
    result = plan("--devices", "8", "--redundant", "0", "--current", str(nested))
    one_line_error(result, 65, f"{nested}: nested too deeply to be an expert map")


# 4 ------------------------------------------------------------------------------------------------


def test_huge_int_param_is_usage_error_in_plan() -> None:
    result = plan("--devices", "8", "--redundant", "0", "--policy", "flashlb", "--param", f"max_iter={HUGE}")
    one_line_error(result, 2, f"parameter 'max_iter': {HUGE} is too large")


def test_bad_param_is_usage_error_in_rebalance_before_any_request(endpoint: str, daemon: FakeDaemon) -> None:
    result = at(endpoint, "rebalance", "--layers", "2", "--dry-run", "--policy", "flashlb",
                "--param", f"max_iter={HUGE}")
    one_line_error(result, 2, f"parameter 'max_iter': {HUGE} is too large")
    assert daemon.names() == []
    # without --policy the params are for the daemon's policy (status says "default": no params)
    result = at(endpoint, "rebalance", "--layers", "2", "--dry-run", "--param", "max_iter=5")
    one_line_error(result, 2, "policy 'default' has no parameter 'max_iter'")
    assert daemon.names() == ["status"]


def test_int_params_must_fit_in_int64() -> None:
    from eplbctl.policies import get_policy

    with pytest.raises(PolicyError, match="64-bit"):
        get_policy("random", {"seed": str(2**63)})
    with pytest.raises(PolicyError, match="64-bit"):
        get_policy("random", {"seed": str(-(2**63) - 1)})
    assert get_policy("random", {"seed": str(2**63 - 1)}).values["seed"] == 2**63 - 1


# 5 ------------------------------------------------------------------------------------------------


def test_policy_refusing_an_instance_as_too_large_is_bad_data_in_plan() -> None:
    result = plan("--devices", "8", "--redundant", "0", "--policy", "exact", "--param", "max_vars=1")
    one_line_error(result, 65, "exact: 256 experts on 8 devices")


# 6 ------------------------------------------------------------------------------------------------


def test_more_slots_per_device_than_experts_is_usage_error() -> None:
    result = plan("--devices", "1", "--redundant", "1")
    one_line_error(result, 2)
    assert result.stderr.endswith("error: 1 redundant slots exceed the 0 that 256 experts on 1 devices can use "
                                  "(one replica of an expert per device)\n")
    result = plan("--devices", "2", "--slots-per-device", "300")
    one_line_error(result, 2, "S=300 slots per device exceeds E=256 experts: at most 256 redundant slots for 2")


def test_long_error_messages_are_shortened(capsys: pytest.CaptureFixture[str]) -> None:
    CliError("slots " + ", ".join(str(i) for i in range(5000))).show()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) <= 420 and err.rstrip().endswith("...")


# 7 ------------------------------------------------------------------------------------------------


def test_plan_threshold_nan_is_usage_error_naming_threshold() -> None:
    result = plan("--devices", "8", "--redundant", "0", "--threshold", "nan")
    one_line_error(result, 2, "Invalid value for '--threshold': nan is not a finite number")


# 8 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["a", "3-1", "1-", "3,,4", "-1"])
def test_malformed_layer_spec_is_rejected_before_any_request(absent: str, spec: str) -> None:
    # no daemon: a request would exit 69, so 2 proves that nothing was sent
    one_line_error(at(absent, "rebalance", "--layers", spec, "--dry-run"), 2)
    one_line_error(at(absent, "rebalance", "--layers", spec, "--yes"), 2)
    one_line_error(plan("--devices", "8", "--redundant", "0", "--layers", spec), 2)


def test_layer_range_is_checked_against_the_daemon(endpoint: str, daemon: FakeDaemon) -> None:
    one_line_error(at(endpoint, "rebalance", "--layers", "3-9", "--dry-run"), 2, "layer 9 out of range 0-7")
    assert daemon.names() == []


# 9 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "No such option '--bogus'."),
    (["nope"], "No such command 'nope'."),
    (["plan"], "Missing option '--devices'."),
    (["status", "--sort", "x"], "Invalid value for '--sort': 'x' is not one of 'layer', 'imbalance'."),
    (["completion", "tcsh"], "Invalid value for '{bash|zsh|fish}': 'tcsh' is not one of"),
    (["rebalance"], "give exactly one of --layers SPEC, --auto or --plan-id ID"),
    (["status", "--watch", "inf"], "Invalid value for '--watch': inf is not in the range"),
    (["status", "--watch", "nan"], "Invalid value for '--watch': nan is not a finite number"),
    (["profile", "--last", "99999999999999999999999"], "Invalid value for '--last': 99999999999999999999999 is"),
])
def test_click_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = run(*args)
    one_line_error(result, 2, message)
    assert "Usage:" not in result.output and "Try " not in result.output


def test_help_still_works() -> None:
    for args in (["--help"], ["plan", "--help"], ["policy"]):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: ")


# 10 -----------------------------------------------------------------------------------------------


def test_ctrl_c_while_following_a_job_names_the_job(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("eplbctl.cli.rebalance.time", types.SimpleNamespace(monotonic=time.monotonic,
                                                                            sleep=interrupt))
    result = at(endpoint, "rebalance", "--layers", "2", "--yes")
    one_line_error(result, 130)
    assert result.stderr == ("eplbctl: error: interrupted; job 1 keeps running in the daemon (follow it with "
                             "'eplbctl status')\n")


# 11 -----------------------------------------------------------------------------------------------


def test_text_file_named_npz_is_not_a_valid_npz(tmp_path: Path) -> None:
    fake = tmp_path / "g.npz"
    fake.write_text("hello\n")
    result = plan("--devices", "8", "--redundant", "0", "--heat", str(fake))
    one_line_error(result, 65, f"{fake}: not a valid .npz file")
    assert "pickle" not in result.stderr
    pickled = tmp_path / "o.npz"
    np.savez(pickled, heat=np.array([{"a": 1}], dtype=object), layer_ids=np.arange(1), source=np.asarray("x"))
    result = plan("--devices", "8", "--redundant", "0", "--heat", str(pickled))
    one_line_error(result, 65, f"{pickled}: not a valid .npz file (it holds pickled objects)")
    assert "allow_pickle" not in result.stderr


# 12 -----------------------------------------------------------------------------------------------


def test_tcp_endpoint_without_key_file_is_usage_error() -> None:
    result = run("--endpoint", "tcp://127.0.0.1:5555", "status")
    one_line_error(result, 2, "a tcp:// endpoint needs --key-file")


@pytest.mark.parametrize("port", ["0", "65536", "abc", ""])
def test_tcp_port_outside_1_65535_is_rejected(port: str, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("secret")
    result = run("--endpoint", f"tcp://127.0.0.1:{port}", "--key-file", str(key), "status")
    one_line_error(result, 2, "endpoint 'tcp://127.0.0.1:")
    with pytest.raises(ValueError, match=r"port|host"):
        resolve_endpoint(f"tcp://127.0.0.1:{port}")


@pytest.mark.parametrize(("endpoint", "message"), [
    ("tcp://*:5555", "tcp://*:5555: cannot connect to a wildcard"),
    ("tcp://a b:1", "cannot connect to tcp://a b:1"),
    ("inproc://x", "unsupported endpoint 'inproc://x'"),
])
@pytest.mark.parametrize("command", ["status", "profile"])
def test_endpoint_zeromq_cannot_connect_to_is_a_usage_error_not_a_hang(endpoint: str, message: str, command: str,
                                                                       tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("secret")
    result = run("--endpoint", endpoint, "--key-file", str(key), "--timeout", "2", command)
    one_line_error(result, 2, message)


def test_tcp_endpoint_forms_that_stay_valid() -> None:
    assert resolve_endpoint("tcp://127.0.0.1:*") == "tcp://127.0.0.1:*"  # bind: the system picks
    assert resolve_endpoint("tcp://[::1]:65535") == "tcp://[::1]:65535"


def test_client_refuses_tcp_without_a_key() -> None:
    from eplbctl.client import Client

    with pytest.raises(ValueError, match="needs a key"):
        Client("tcp://127.0.0.1:5555", timeout_s=1)
    with pytest.raises(ValueError, match="finite"):
        Client("ipc:///tmp/x.sock", timeout_s=float("inf"))


# 13 -----------------------------------------------------------------------------------------------


def test_json_booleans_in_heat_counts_are_bad_data(tmp_path: Path) -> None:
    with pytest.raises(HeatError, match="true/false at layer 1 expert 0"):
        validate_heat([[1, 2], [True, 3]], "x")
    with pytest.raises(HeatError, match="true/false at step 0 layer 0 expert 1"):
        validate_heat([[[1, False]]], "x")
    with pytest.raises(HeatError, match="boolean array"):
        validate_heat(np.ones((2, 2), dtype=bool), "x")
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"logical_count": [[1, True, 3, 4], [2, 2, 2, 2]]}))
    result = run("plan", "--heat", str(bad), "--devices", "2", "--redundant", "0")
    one_line_error(result, 65, f"{bad}: logical_count: true/false at layer 0 expert 1")


# 15 -----------------------------------------------------------------------------------------------


def test_policy_completion_lists_registered_names() -> None:
    from eplbctl.policies import REGISTRY

    builtin = sorted(name for name, cls in REGISTRY.items() if cls.__module__.startswith("eplbctl.policies."))
    assert sorted(BUILTIN_POLICIES) == builtin  # the static list cannot drift from the registry
    names = [item.value for item in complete_policy(None, None, "")]  # type: ignore[arg-type]
    assert set(builtin) <= set(names)
    assert [item.value for item in complete_policy(None, None, "fl")] == ["flashlb"]  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["plan", "rebalance"])
def test_policy_completion_in_the_shell_does_not_import_numba(command: str) -> None:
    env = {**os.environ, "_EPLBCTL_COMPLETE": "bash_complete", "COMP_WORDS": f"eplbctl {command} --policy s",
           "COMP_CWORD": "3"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "eplbctl.cli"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["plain,swift"]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "numba" not in imported and "eplbctl" in imported


# 16 -----------------------------------------------------------------------------------------------


def test_protocol_doc_states_the_frame_count_the_code_expects() -> None:
    from eplbctl import protocol

    text = (REPO / "docs" / "protocol.md").read_text()
    assert protocol._N_SIGNED + 1 == 4
    assert "Exactly these four frames (signature, header, parent_header, content) follow the delimiter" in text
    assert "five frames follow" not in text


# 17 -----------------------------------------------------------------------------------------------


def test_confirmation_needs_a_terminal(endpoint: str, daemon: FakeDaemon) -> None:
    result = at(endpoint, "rebalance", "--layers", "2", input="y\n")  # `echo y | eplbctl rebalance ...`
    one_line_error(result, 1, "no terminal to confirm on")
    assert "--yes" in result.stderr
    assert daemon.names() == []  # not even the preview: nothing was planned or changed


# 18 -----------------------------------------------------------------------------------------------


def test_failed_job_without_end_step_prints_from_step(capsys: pytest.CaptureFixture[str]) -> None:
    from eplbctl.cli.output import Terminal

    job = {"job_id": 1, "state": "failed", "layers": [1, 2, 3, 4, 5], "done_layers": [1, 2],
           "error": "rank 1 died", "started_step": 49, "finished_step": None}
    with pytest.raises(CliError, match="job 1 failed: rank 1 died"):
        report_job(Terminal(), job, as_json=False, show_job_plan=False)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "job 1 failed: 2 of 5 layers moved (from step 49)"
    assert "None" not in out


# 19 -----------------------------------------------------------------------------------------------


def test_verify_prints_digests(endpoint: str, daemon: FakeDaemon) -> None:
    result = at(endpoint, "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("step 130: baseline abcd, current abcd\n"
                             "model output is bit-identical to the baseline\n")
    result = at(endpoint, "verify", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"baseline": "abcd", "current": "abcd", "step": 130, "ok": True}
    assert daemon.names() == ["verify", "verify"]


def test_verify_mismatch_exits_1(sockdir: Path) -> None:
    server = serve(f"ipc://{sockdir / 'bad.sock'}", FakeDaemon(bad_verify=True))
    try:
        result = at(server.bound_endpoint, "verify", "--json")
    finally:
        server.stop()
    one_line_error(result, 1, "model output differs from the start-up baseline")
    assert json.loads(result.stdout)["current"] == "ffff"  # stdout stays pure JSON


def test_shutdown_asks_the_daemon_to_stop(endpoint: str, daemon: FakeDaemon) -> None:
    result = at(endpoint, "shutdown")
    assert result.exit_code == 0, result.output
    assert daemon.stopped.is_set() and daemon.names() == ["shutdown"]
    assert result.stderr == f"eplbd at {endpoint} is shutting down\n"


def test_shutdown_without_daemon_is_unavailable(absent: str) -> None:
    one_line_error(at(absent, "shutdown"), 69, "no eplbd daemon at")
