"""The rebalance request: a confirmed preview runs as previewed, `dry_run` is required, and a policy
refusing the instance is the request's problem (422), not the daemon's (500).

Most tests drive a real `eplbd sim` over its real socket; each test uses its own layers of the
module's deployment (0: apply, 1-2: stale, 3: CLI apply by --plan-id, then confirmed, 2: CLI stale),
and the last takes whatever state the others left.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner, Result
from simdaemon import SMALL, running_sim, wait_job

from eplbctl.cli import main
from eplbctl.client import DaemonError
from eplbctl.placement import contiguous_placement, count_moves
from eplbctl.policies import REGISTRY
from eplbctl.policies.base import Policy, PolicyResult

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def sim():
    with running_sim(*SMALL) as daemon:
        yield daemon


def phy2log(c, layers=range(4)) -> list:
    return [c.request("inspect", {"layer": la})["phy2log"] for la in layers]


def wait_ticks(c, ticks: int = 2, timeout_s: float = 60.0) -> None:
    """Let the heat window move on, so that a fresh plan would be made on newer heat."""
    start = c.request("status", {})["step"]
    deadline = time.monotonic() + timeout_s
    while c.request("status", {})["step"] < start + 4 * ticks:  # SMALL ticks every 4 steps
        assert time.monotonic() < deadline, "the deployment stopped stepping"
        time.sleep(0.2)


def assert_idle(c) -> None:
    st = c.request("status", {})
    assert st["transfer"] == "idle" and st["job"] is None and st["fault"] is None, st


def rebalance_error(c, content: dict) -> DaemonError:
    with pytest.raises(DaemonError) as err:
        c.request("rebalance", content)
    return err.value


# ----------------------------------------------------------------------------- 1: the confirmed plan runs


def test_confirmed_preview_runs_exactly_the_previewed_plan_not_a_fresh_one(sim):
    with sim.client() as c:
        before = np.array(phy2log(c))
        preview = c.request("rebalance", {"layers": [0], "dry_run": True})["plan"]
        assert isinstance(preview["plan_id"], str) and preview["layers"][0]["change"]
        wait_ticks(c)
        job = c.request("rebalance", {"plan_id": preview["plan_id"], "dry_run": False})["job"]
        assert job["layers"] == [0] and job["plan"] == preview
        done = wait_job(c, job["job_id"], settled=False)
        assert done["state"] == "done", done
        after = np.array(phy2log(c))
        # The rows that ran make exactly the moves the operator saw, and touch nothing else.
        assert count_moves(before, after).tolist() == [preview["layers"][0]["moves"], 0, 0, 0]
        assert c.request("verify", {})["ok"]

        again = rebalance_error(c, {"plan_id": preview["plan_id"], "dry_run": False})
        assert again.code == 409 and again.content.get("plan_stale")       # a preview applies once
        assert np.array_equal(np.array(phy2log(c)), after)


def test_apply_is_refused_when_a_previewed_layer_changed_since_and_nothing_moves(sim):
    with sim.client() as c:
        preview = c.request("rebalance", {"layers": [1, 2], "dry_run": True})["plan"]
        other = c.request("rebalance", {"layers": [1], "dry_run": False})["job"]   # another job runs meanwhile
        assert wait_job(c, other["job_id"], settled=False)["state"] == "done"
        placed = phy2log(c)
        err = rebalance_error(c, {"plan_id": preview["plan_id"], "dry_run": False})
        assert err.code == 409 and err.content.get("plan_stale")
        assert "layer(s) 1 changed since plan" in str(err)
        assert phy2log(c) == placed
        assert_idle(c)


def test_unknown_plan_id_is_refused_as_stale_and_a_bad_one_as_malformed(sim):
    with sim.client() as c:
        placed = phy2log(c)
        err = rebalance_error(c, {"plan_id": "0" * 32, "dry_run": False})
        assert err.code == 409 and err.content.get("plan_stale") and "unknown or expired" in str(err)
        assert rebalance_error(c, {"plan_id": 7, "dry_run": False}).code == 400
        preview = c.request("rebalance", {"layers": [3], "dry_run": True})["plan"]
        assert rebalance_error(c, {"plan_id": preview["plan_id"], "dry_run": True}).code == 422
        assert phy2log(c) == placed
        assert_idle(c)


# ----------------------------------------------------------------------------- 2: dry_run is required


def test_rebalance_without_dry_run_is_malformed_and_starts_nothing(sim):
    with sim.client() as c:
        placed = phy2log(c)
        err = rebalance_error(c, {"layers": [0]})
        assert err.code == 400 and "dry_run" in str(err)
        assert rebalance_error(c, {"layers": [0], "dry_run": "no"}).code == 400
        assert phy2log(c) == placed
        assert_idle(c)


# ----------------------------------------------------------------------------- 3: a policy's refusal is 422


def test_policy_refusing_the_instance_is_422_with_its_message_not_500(sim):
    with sim.client() as c:
        events = c.request("status", {})["events"]
        for dry_run in (True, False):
            err = rebalance_error(c, {"layers": [0], "policy": "exact", "dry_run": dry_run})
            assert err.code == 422, err
            assert str(err).startswith("exact: ") and "max_vars" in str(err) and "\n" not in str(err)
        assert_idle(c)
        assert c.request("status", {})["events"] == events       # the request's problem, not a daemon event
        assert c.request("rebalance", {"layers": [0], "dry_run": True})["plan"]["layers"]  # still planning
    result = run(sim.endpoint, "rebalance", "--layers", "0", "--policy", "exact", "--dry-run")
    assert result.exit_code == 65, result.output
    assert result.stderr.startswith("eplbctl: error: exact: ") and result.stderr.count("\n") == 1


class _Crashes(Policy):
    name: ClassVar[str] = "crashes"

    def place(self, heat, current, topo) -> PolicyResult:
        raise RuntimeError("boom")


class _Invalid(Policy):
    name: ClassVar[str] = "invalid"

    def place(self, heat, current, topo) -> PolicyResult:
        return PolicyResult(np.zeros_like(current), np.ones(len(current), dtype=bool), "global")


def _job(policy: str, params: dict | None = None):
    from eplbd.planner import PlanJob

    return PlanJob(policy, params or {}, np.arange(1.0, 257.0)[None, :], contiguous_placement(1, 256, 4, 72),
                   {"num_devices": 4, "slots_per_device": 72}, None, 0.0, 0)


def test_only_the_policys_own_errors_are_refusals_crashes_stay_failures(monkeypatch):
    from eplbd.planner import PolicyRefused, run_plan

    from eplbctl.policies.exact import ExactTooLarge

    with pytest.raises(PolicyRefused) as refused:
        run_plan(_job("exact"))
    assert isinstance(refused.value.__cause__, ExactTooLarge) and "max_vars" in str(refused.value)
    with pytest.raises(PolicyRefused):
        run_plan(_job("exact", {"max_vars": "-1"}))
    monkeypatch.setitem(REGISTRY, "crashes", _Crashes)
    monkeypatch.setitem(REGISTRY, "invalid", _Invalid)
    for name in ("crashes", "invalid"):
        with pytest.raises(Exception) as err:
            run_plan(_job(name))
        assert not isinstance(err.value, PolicyRefused), err.value   # reported as a failure (500)
    with pytest.raises(PolicyRefused):
        run_plan(_job("exact"))   # a refusal after a crash is still told apart


# ----------------------------------------------------------------------------- stored plans


def test_plan_store_keeps_a_bounded_number_of_previews_for_a_while():
    from eplbd.plans import PlanStore

    now = [0.0]
    store = PlanStore(ttl_s=10, keep=3, clock=lambda: now[0])
    current = contiguous_placement(2, 8, 2, 5)
    planned = current[:, :, ::-1].copy()
    ids = [store.add([0, 1], current, planned, {"layers": []}) for _ in range(5)]
    assert len(store) == 3 and len(set(ids)) == 5
    with pytest.raises(Exception) as err:
        store.take(ids[0], current)                  # evicted: only the last 3 are kept
    assert err.value.code == 409 and err.value.details == {"plan_stale": True}
    taken = store.take(ids[4], current)
    assert taken.report["plan_id"] == ids[4] and np.array_equal(taken.rows, planned)
    now[0] = 11.0
    with pytest.raises(Exception) as err:
        store.take(ids[3], current)                  # expired
    assert "unknown or expired" in str(err.value)
    assert len(store) == 0
    fresh = store.add([1], current, planned, {"layers": []})
    moved = current.copy()
    moved[1] = planned[1]
    with pytest.raises(Exception) as err:
        store.take(fresh, moved)
    assert "layer(s) 1 changed" in str(err.value)


# ----------------------------------------------------------------------------- the CLI


def run(endpoint: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, ["--endpoint", endpoint, "--timeout", "60", *args], input=input,
                              catch_exceptions=False)


@pytest.fixture
def tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("eplbctl.cli.rebalance.stdin_is_tty", lambda: True)


def test_cli_applies_a_preview_saved_earlier_by_its_plan_id_once(sim):
    import json

    # a partial move, so that the next test still finds layer 3 worth rebalancing
    result = run(sim.endpoint, "rebalance", "--layers", "3", "--policy", "swift", "--param", "max_moves=0.03",
                 "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    with sim.client() as c:
        before = phy2log(c, [3])
    result = run(sim.endpoint, "rebalance", "--plan-id", plan["plan_id"], "--yes", "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)["job"]
    assert job["state"] == "done" and job["plan"]["plan_id"] == plan["plan_id"]
    with sim.client() as c:
        assert phy2log(c, [3]) != before
    again = run(sim.endpoint, "rebalance", "--plan-id", plan["plan_id"], "--yes")
    assert again.exit_code == 75 and "preview again" in again.stderr
    for extra in (["--layers", "3"], ["--dry-run"], ["--policy", "swift"], ["--min-gain", "0"]):
        bad = run(sim.endpoint, "rebalance", "--plan-id", plan["plan_id"], "--yes", *extra)
        assert bad.exit_code == 2, bad.output


def test_cli_confirmed_rebalance_applies_the_preview_and_yes_plans_fresh(sim, tty):
    import json

    result = run(sim.endpoint, "rebalance", "--layers", "3", "--json", input="y\n")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)["job"]
    assert isinstance(job["plan"]["plan_id"], str) and job["state"] == "done"
    result = run(sim.endpoint, "rebalance", "--layers", "3", "--yes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["job"]["plan"]["plan_id"] is None


def test_cli_says_preview_again_when_the_plan_changed_and_moves_nothing(sim, tty, monkeypatch):
    placed = {}

    def another_job_runs_while_the_operator_reads(question: str) -> bool:
        with sim.client() as c:
            job = c.request("rebalance", {"layers": [2], "dry_run": False})["job"]
            assert wait_job(c, job["job_id"], settled=False)["state"] == "done"
            placed["layers"] = phy2log(c)
        return True

    monkeypatch.setattr("eplbctl.cli.rebalance._confirm", another_job_runs_while_the_operator_reads)
    result = run(sim.endpoint, "rebalance", "--layers", "2", input="y\n")
    assert result.exit_code == 75, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eplbctl: error: the previewed plan cannot be applied: the placement of layer(s) 2 "
                           "changed since plan") and "preview again" in last
    with sim.client() as c:
        assert phy2log(c) == placed["layers"]
        assert_idle(c)


# ----------------------------------------------------------------------------- last: takes any state


def test_auto_apply_keeps_the_previewed_layer_set(sim):
    with sim.client() as c:
        preview = c.request("rebalance", {"auto": True, "threshold": 1.0, "dry_run": True})["plan"]
        wait_ticks(c)
        job = c.request("rebalance", {"plan_id": preview["plan_id"], "dry_run": False})["job"]
        assert job["requested_layers"] == [row["layer"] for row in preview["layers"]]
        assert job["layers"] == [row["layer"] for row in preview["layers"] if row["change"]]
        assert job["plan"] == preview
        assert wait_job(c, job["job_id"], settled=False)["state"] in ("done", "nochange")
