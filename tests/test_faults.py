"""Fault injection on a real `eplbd sim`: corruption in flight, a killed rank, a failing or hanging
policy, a client that disconnects mid-command. After every successful redeployment the model output
is bit-identical to the baseline."""

from __future__ import annotations

import time

import pytest
import zmq
from click.testing import CliRunner
from simdaemon import running_sim, wait_job

from eplbctl.cli import main
from eplbctl.client import DaemonError
from eplbctl.protocol import make_request, new_session, serialize

pytestmark = pytest.mark.timeout(400)

BASE = ["--layers", "4", "--tokens", "32", "--tick", "4", "--window", "10", "--hidden", "32", "--ffn", "64"]


def test_corrupted_transfer_aborts_the_layer_on_every_rank_and_keeps_output():
    with running_sim("--ranks", "2", *BASE, "--fault", "corrupt:rank=1:layer=2") as sim, sim.client() as c:
        before = c.request("inspect", {"layer": 2})["phy2log"]
        job = wait_job(c, c.request("rebalance", {"layers": [2], "dry_run": False})["job"]["job_id"], settled=False)
        assert job["state"] == "failed" and "layer 2 aborted on every rank" in job["error"]
        assert "rank 1: checksum mismatch" in job["error"]             # named as corruption, not a timeout
        assert c.request("inspect", {"layer": 2})["phy2log"] == before        # old placement kept
        assert c.request("verify", {})["ok"]
        st = c.request("status", {})
        assert st["fault"] is None and st["transfer"] == "idle"
        assert any("aborted" in e for e in st["events"])
        again = wait_job(c, c.request("rebalance", {"layers": [2], "dry_run": False})["job"]["job_id"])
        assert again["state"] == "done"                                        # the fault fired once
        assert c.request("inspect", {"layer": 2})["phy2log"] != before
        assert c.request("verify", {})["ok"]


def test_failing_or_hanging_policy_means_no_change_and_the_next_rebalance_works():
    args = ["--ranks", "2", *BASE, "--fault", "policy-raise", "--fault", "policy-hang", "--plan-timeout", "3"]
    with running_sim(*args) as sim, sim.client(timeout_s=30) as c:
        before = [c.request("inspect", {"layer": la})["phy2log"] for la in range(4)]
        with pytest.raises(DaemonError) as err:
            c.request("rebalance", {"layers": [0], "dry_run": False})
        assert err.value.code == 500 and "injected policy failure" in str(err.value)
        started = time.monotonic()
        with pytest.raises(DaemonError) as err:
            c.request("rebalance", {"layers": [0], "dry_run": False})
        assert err.value.code == 500 and "did not answer within 3s" in str(err.value)
        assert time.monotonic() - started < 15
        assert [c.request("inspect", {"layer": la})["phy2log"] for la in range(4)] == before
        events = c.request("status", {})["events"]
        assert any("injected policy failure" in e for e in events)
        assert any("did not answer" in e for e in events)
        job = wait_job(c, c.request("rebalance", {"layers": [0], "dry_run": False})["job"]["job_id"])
        assert job["state"] == "done"
        assert c.request("verify", {})["ok"]


def test_client_disconnecting_mid_command_does_not_wedge_the_daemon():
    with running_sim("--ranks", "2", *BASE) as sim:
        ctx = zmq.Context.instance()
        for _ in range(3):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(sim.endpoint)
            sock.send_multipart(serialize(make_request("verify", {}, new_session())))
            sock.close()                                   # gone before the reply
        with sim.client() as c:
            assert c.request("status", {})["fault"] is None
            assert c.request("verify", {})["ok"]


def test_killed_rank_mid_redeployment_stops_the_others_within_the_timeout_and_status_shows_it():
    args = ["--ranks", "3", *BASE, "--redundant", "2", "--comm-timeout", "6", "--fault", "kill:rank=2:layer=1"]
    with running_sim(*args) as sim, sim.client(timeout_s=30) as c:
        before = c.request("inspect", {"layer": 1})["phy2log"]
        job = c.request("rebalance", {"layers": [0, 1, 2, 3], "dry_run": False})["job"]
        started = time.monotonic()
        done = wait_job(c, job["job_id"], timeout_s=60, settled=False)
        assert done["state"] == "failed"
        assert time.monotonic() - started < 40
        st = c.request("status", {})                       # the control server still answers
        assert st["transfer"] == "failed" and st["fault"].startswith("rank 2 exited with code 17")
        with pytest.raises(DaemonError) as err:
            c.request("rebalance", {"layers": [1], "dry_run": False})
        assert err.value.code == 503 and "failed" in str(err.value)
        assert err.value.content.get("deployment_failed") is True       # not "busy": retrying cannot help
        cli = CliRunner().invoke(main, ["--endpoint", sim.endpoint, "--timeout", "30", "verify"])
        assert cli.exit_code == 1 and "the deployment has failed" in cli.output, cli.output
        assert 0 in done["done_layers"] and 1 not in done["done_layers"]
        assert done["finished_step"] is not None
        record = c.request("profile", {})["records"][-1]                # the failed job keeps its profile
        assert record["job_id"] == job["job_id"] and record["per_layer"][0]["layer"] == 0
        assert before is not None


def test_hung_rank_is_named_and_stopped_while_the_others_keep_the_old_placement():
    args = ["--ranks", "3", *BASE, "--redundant", "2", "--comm-timeout", "4", "--fault", "hang:rank=1:layer=1"]
    with running_sim(*args) as sim, sim.client(timeout_s=30) as c:
        job = c.request("rebalance", {"layers": [0, 1, 2], "dry_run": False})["job"]
        done = wait_job(c, job["job_id"], timeout_s=60, settled=False)
        assert done["state"] == "failed" and 1 not in done["done_layers"]
        deadline = time.monotonic() + 40
        fault = ""
        while "rank 1 stopped answering" not in fault and time.monotonic() < deadline:
            time.sleep(0.5)
            fault = c.request("status", {})["fault"] or ""
        assert "rank 1 stopped answering (hung)" in fault and "rank 2 exited" not in fault, fault


def test_layer_needing_more_staging_than_a_rank_has_is_refused_before_anything_moves():
    with running_sim("--ranks", "2", *BASE, "--staging-slots", "8") as sim, sim.client() as c:
        before = c.request("inspect", {"layer": 1})["phy2log"]
        with pytest.raises(DaemonError) as err:
            c.request("rebalance", {"layers": [1], "dry_run": False})
        assert err.value.code == 422 and "more than its 8 staging slots" in str(err.value)
        assert c.request("inspect", {"layer": 1})["phy2log"] == before
        # its preview says so up front and keeps no plan_id that could only be refused later
        plan = c.request("rebalance", {"layers": [1], "dry_run": True})["plan"]
        assert plan["plan_id"] is None and "more than its 8 staging slots" in plan["refused"]
        cli = CliRunner().invoke(main, ["--endpoint", sim.endpoint, "rebalance", "--layers", "1", "--dry-run"])
        assert cli.exit_code == 0 and "this plan cannot be applied" in cli.stderr, cli.output
        small = c.request("rebalance", {"layers": [1], "policy": "swift", "params": {"max_moves": "0.02"},
                                        "dry_run": False})["job"]
        done = wait_job(c, small["job_id"], settled=False)
        assert done["state"] in ("done", "nochange"), done
        assert c.request("verify", {})["ok"]


def test_killing_the_launcher_takes_every_rank_down_and_ranks_are_findable_by_name():
    import os
    import signal
    import subprocess

    with running_sim("--ranks", "2", *BASE) as sim:
        children = subprocess.run(["pgrep", "-P", str(sim.proc.pid)], capture_output=True, text=True).stdout.split()
        names = {open(f"/proc/{pid}/comm").read().strip() for pid in children if os.path.exists(f"/proc/{pid}")}
        assert {"eplbd-rank0", "eplbd-rank1"} <= names
        os.kill(sim.proc.pid, signal.SIGKILL)
        sim.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        alive = children
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in children if _running(pid)]
        assert not alive, f"ranks outlived their launcher: {alive}"


def _running(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_second_daemon_on_a_live_endpoint_is_one_line_and_starts_no_rank():
    import subprocess
    import sys

    with running_sim("--ranks", "2", *BASE) as sim:
        out = subprocess.run([sys.executable, "-m", "eplbd.main", "sim", "--ranks", "2", "--endpoint", sim.endpoint],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 75
        assert out.stderr.strip().count("\n") == 0 and "already serving" in out.stderr, out.stderr
        with sim.client() as c:
            assert c.request("status", {})["fault"] is None          # the first one is untouched
