"""Commands that need no daemon (plan, policy list, completion) and the CLI's import discipline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eplbctl.cli import main
from eplbctl.cli.completion import SHELLS, completion_source
from eplbctl.heat import default_heat_path
from eplbctl.mapfile import read_map

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------------- plan


def test_plan_bundled_heat() -> None:
    result = run("plan", "--devices", "8", "--redundant", "16")  # the bundled heat is the default
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith(": 58 MoE layers x 256 experts on 8 devices x 34 slots (16 redundant)")
    assert lines[1].split() == ["layer", "model", "layer", "before", "after", "moves", "bytes", "change"]
    assert lines[2].split()[:2] == ["0", "3"]  # MoE layer 0 is DeepSeek-V3's model layer 3
    assert lines[-1].startswith("policy default (global, ")
    rows = [line.split() for line in lines[2:-1]]
    assert len(rows) == 58 and all(float(r[3]) <= float(r[2]) for r in rows)
    assert "eplbctl: note: dropped 3 leading all-zero layers as dense" in result.stderr


def test_plan_json_and_out(tmp_path: Path) -> None:
    out = tmp_path / "map.json"
    result = run("plan", "--heat", str(default_heat_path()), "--devices", "8", "--slots-per-device", "34",
                 "--layers", "0-3", "--bytes-per-expert", "1000", "--json", "--out", str(out), "--format",
                 "sglang")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [row["layer"] for row in body["plan"]["layers"]] == [0, 1, 2, 3]
    assert body["plan"]["summary"]["bytes"] == 1000 * body["plan"]["summary"]["moves"]
    assert body["slots_per_device"] == 34 and body["out"] == str(out)
    assert read_map(out, num_devices=8).shape == (58, 8, 34)


def test_plan_real_heat_files(shared_data: Path) -> None:
    heat = shared_data / "heat" / "deepseek_v3" / "decode_in1000out1000.json"
    result = run("plan", "--heat", str(heat), "--devices", "32", "--redundant", "32", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)["plan"]["summary"]
    assert summary["after"]["mean"] < 1.02 < summary["before"]["mean"]
    qwen = shared_data / "heat" / "qwen" / "qwen3_235b_a22b.json"
    result = run("plan", "--heat", str(qwen), "--devices", "64", "--redundant", "64", "--nodes", "8",
                 "--groups", "8")
    assert result.exit_code == 0, result.output
    assert "(hierarchical, " in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redundant", "3"],
         "eplbctl: error: 256 experts + 3 redundant slots do not divide over 8 devices; "
         "the smallest redundant count >= 3 that works is 8\n"),
        (["--slots-per-device", "2"],
         "eplbctl: error: 8 devices x 2 slots cannot hold 256 experts; use --slots-per-device 32 or more\n"),
        # the list of valid names grows with the registry: only its start is fixed
        (["--redundant", "8", "--policy", "nope"], "eplbctl: error: unknown policy 'nope' (valid: "),
        (["--redundant", "8", "--layers", "58"], "eplbctl: error: layer 58 out of range 0-57\n"),
    ],
)
def test_plan_usage_errors(args: list[str], message: str) -> None:
    result = run("plan", "--heat", str(default_heat_path()), "--devices", "8", *args)
    assert result.exit_code == 2
    assert (result.stderr.splitlines()[-1] + "\n").startswith(message)


@pytest.mark.parametrize(
    "args", [[], ["--redundant", "8", "--slots-per-device", "33"], ["--redundant", "8", "--nodes", "2"]]
)
def test_plan_option_combinations(args: list[str]) -> None:
    result = run("plan", "--heat", str(default_heat_path()), "--devices", "8", *args)
    assert result.exit_code == 2
    # click's usage errors are one line like ours (no "Usage:"/"Try ... --help" lines)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("eplbctl: error: ")


def test_plan_bad_data_is_65(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"logical_count": [[1, 2, -3, 4], [1, 2, 3, 4]]}))
    result = run("plan", "--heat", str(bad), "--devices", "2", "--redundant", "0")
    assert result.exit_code == 65
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"eplbctl: error: {bad}")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = run("plan", "--heat", str(garbage), "--devices", "2", "--redundant", "0")
    assert result.exit_code == 65
    assert result.stderr == f"eplbctl: error: {garbage}: not valid JSON (line 1: Expecting property name " \
                            "enclosed in double quotes)\n"


def test_plan_current_map_mismatch(tmp_path: Path) -> None:
    out = tmp_path / "map.json"
    assert run("plan", "--heat", str(default_heat_path()), "--devices", "8", "--redundant", "16",
               "--out", str(out)).exit_code == 0
    # the same map as --current: nothing left to gain for most layers, and shapes agree
    result = run("plan", "--heat", str(default_heat_path()), "--devices", "8", "--redundant", "16",
                 "--current", str(out), "--threshold", "0.01", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["plan"]["summary"]["moves"] == 0
    result = run("plan", "--heat", str(default_heat_path()), "--devices", "8", "--redundant", "24",
                 "--current", str(out))
    assert result.exit_code == 65
    assert result.stderr.endswith("map has shape (58, 8, 34) (layers, devices, slots), but the heat and "
                                  "options need (58, 8, 35)\n")


# ----------------------------------------------------------------------------- policy list


def test_policy_list() -> None:
    result = run("policy", "list")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].split()[:2] == ["policy", "summary"]
    assert any(line.startswith("default ") for line in result.stdout.splitlines())
    body = json.loads(run("policy", "list", "--json").stdout)
    assert "default" in [p["name"] for p in body["policies"]]


# ----------------------------------------------------------------------------- completion


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_command_prints_clicks_script(shell: str) -> None:
    result = run("completion", shell)
    assert result.exit_code == 0
    assert result.stdout == completion_source(shell) + "\n"
    assert "_EPLBCTL_COMPLETE" in result.stdout


def test_completion_bad_shell() -> None:
    result = run("completion", "tcsh")
    assert result.exit_code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.stderr


def test_committed_completions_are_fresh() -> None:
    for shell in SHELLS:
        committed = (REPO / "completions" / f"eplbctl.{shell}").read_text()
        assert committed == completion_source(shell) + "\n", f"run python completions/generate.py ({shell})"


def test_bash_completion_loads_and_completes() -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    loaded = subprocess.run(["bash", "-c", "source completions/eplbctl.bash && complete -p eplbctl"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "complete -o nosort -F _eplbctl_completion eplbctl"
    # What the loaded function asks the program at <TAB>: `eplbctl reb` -> rebalance.
    env = {**os.environ, "COMP_WORDS": "eplbctl reb", "COMP_CWORD": "1", "_EPLBCTL_COMPLETE": "bash_complete"}
    answer = subprocess.run([sys.executable, "-m", "eplbctl.cli"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert answer.stdout.strip() == "plain,rebalance"


# ----------------------------------------------------------------------------- import discipline

PROBE = """
import sys
from eplbctl.cli import main
try:
    main(sys.argv[1:], prog_name="eplbctl")
except SystemExit as exc:
    code = exc.code
print("torch" in sys.modules, code)
"""


@pytest.mark.parametrize("args", [["status"], ["rebalance", "--auto", "--yes"], ["profile", "--json"]])
def test_daemon_commands_do_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    endpoint = f"ipc://{tmp_path}/none.sock"
    probe = subprocess.run([sys.executable, "-c", PROBE, "--endpoint", endpoint, *args], capture_output=True,
                           text=True, timeout=60)
    torch_loaded, code = probe.stdout.split()
    assert torch_loaded == "False"
    assert code == ("3" if args[0] == "status" else "69")
