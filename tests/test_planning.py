"""make_plan: finishing step (device matching, slot keeping), gain gate, moves/bytes, layers, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import msgpack
import numpy as np
import pytest

from eplbctl.metrics import predicted_imbalance
from eplbctl.placement import contiguous_placement, count_moves, validate_placement
from eplbctl.planning import Plan, PlanError, keep_slots, make_plan, match_devices
from eplbctl.policies import Param, Policy, PolicyError, PolicyResult, Topology, get_policy


def skewed_heat(layers: int = 6, experts: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.zipf(1.4, size=(layers, experts)).clip(max=10**5).astype(np.float64)


class Fixed(Policy):
    """Answers a fixed placement and change vector (for gate tests)."""

    name: ClassVar[str] = "fixed"
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, placement, change, mode="global", error: Exception | None = None):
        super().__init__()
        self.answer, self.flags, self.mode, self.error = placement, change, mode, error

    def place(self, heat, current, topo):
        if self.error is not None:
            raise self.error
        return PolicyResult(np.asarray(self.answer), np.asarray(self.flags), self.mode)


def test_plan_is_valid_and_reports_what_it_holds():
    heat = skewed_heat()
    topo = Topology(8, 5)
    current = contiguous_placement(6, 32, 8, 5)
    plan = make_plan(heat, current, topo, get_policy("default"), bytes_per_expert=1000)
    validate_placement(plan.placement, 32)
    assert plan.policy == "default" and plan.mode == "global" and plan.seconds >= 0
    assert [lp.layer for lp in plan.layers] == list(range(6))
    moves = count_moves(current, plan.placement)
    before = predicted_imbalance(current, heat)
    after = predicted_imbalance(plan.placement, heat)
    for lp in plan.layers:
        assert lp.moves == moves[lp.layer] and lp.bytes == 1000 * lp.moves
        assert lp.before == pytest.approx(before[lp.layer]) and lp.after == pytest.approx(after[lp.layer])
        assert lp.change == (lp.after < lp.before)
    assert any(lp.change for lp in plan.layers)
    # finishing does not change balance: same imbalance as the policy's raw answer
    raw = get_policy("default").place(heat, current, topo).placement
    changed = plan.changed_layers
    np.testing.assert_allclose(after[changed], predicted_imbalance(raw, heat)[changed])


def test_staying_experts_keep_their_slot():
    heat = skewed_heat(seed=1)
    topo = Topology(8, 5)
    first = make_plan(heat, contiguous_placement(6, 32, 8, 5), topo, get_policy("default")).placement
    drifted = heat * np.random.default_rng(2).uniform(0.5, 1.5, size=heat.shape)
    plan = make_plan(drifted, first, topo, get_policy("default"))
    new = plan.placement
    for layer, dev, slot in np.ndindex(*new.shape):
        expert = first[layer, dev, slot]
        if expert in new[layer, dev]:
            assert new[layer, dev, slot] == expert


def test_matching_undoes_device_and_slot_permutations():
    current = get_policy("default").place(skewed_heat(), contiguous_placement(6, 32, 8, 5), Topology(8, 5))
    cur = current.placement
    rng = np.random.default_rng(5)
    shuffled = cur[:, rng.permutation(8)]
    shuffled = np.take_along_axis(shuffled, rng.permuted(np.tile(np.arange(5), (6, 8, 1)), axis=2), axis=2)
    finished = keep_slots(match_devices(shuffled, cur, 32, None), cur)
    np.testing.assert_array_equal(finished, cur)
    assert count_moves(cur, finished).sum() == 0


def test_matching_keeps_hierarchical_nodes_whole():
    heat = skewed_heat(layers=4, experts=32, seed=3)
    topo = Topology(8, 5, num_nodes=2, num_groups=4)
    current = contiguous_placement(4, 32, 8, 5)
    plan = make_plan(heat, current, topo, get_policy("default"))
    assert plan.mode == "hierarchical"
    for layer in plan.changed_layers:
        for node in range(2):
            groups = set((plan.placement[layer, node * 4:(node + 1) * 4] // 8).ravel().tolist())
            assert len(groups) == 2


def test_gain_gate_keeps_rows_unchanged():
    heat = skewed_heat()
    topo = Topology(8, 5)
    current = contiguous_placement(6, 32, 8, 5)
    plan = make_plan(heat, current, topo, get_policy("default"), min_gain=1e9)
    np.testing.assert_array_equal(plan.placement, current)
    for lp in plan.layers:
        assert not lp.change and lp.moves == 0 and lp.bytes == 0 and lp.after == lp.before


def test_gate_obeys_policy_no_change_even_when_better():
    heat = skewed_heat()
    topo = Topology(8, 5)
    current = contiguous_placement(6, 32, 8, 5)
    better = get_policy("default").place(heat, current, topo).placement
    plan = make_plan(heat, current, topo, Fixed(better, np.zeros(6, bool)))
    np.testing.assert_array_equal(plan.placement, current)


def test_gate_refuses_a_worse_table_marked_change():
    heat = skewed_heat()
    topo = Topology(8, 5)
    good = get_policy("default").place(heat, contiguous_placement(6, 32, 8, 5), topo).placement
    worse = contiguous_placement(6, 32, 8, 5)
    plan = make_plan(heat, good, topo, Fixed(worse, np.ones(6, bool)))
    np.testing.assert_array_equal(plan.placement, good)
    assert not plan.changed_layers


def test_layers_restriction_leaves_others_untouched():
    heat = skewed_heat()
    topo = Topology(8, 5)
    current = contiguous_placement(6, 32, 8, 5)
    plan = make_plan(heat, current, topo, get_policy("default"), layers=[4, 1, 4])
    assert [lp.layer for lp in plan.layers] == [1, 4]
    others = [0, 2, 3, 5]
    np.testing.assert_array_equal(plan.placement[others], current[others])
    full = make_plan(heat, current, topo, get_policy("default"))
    np.testing.assert_array_equal(plan.placement[[1, 4]], full.placement[[1, 4]])
    with pytest.raises(PlanError, match="layer 6 out of range"):
        make_plan(heat, current, topo, get_policy("default"), layers=[6])
    empty = make_plan(heat, current, topo, get_policy("default"), layers=[])
    assert empty.layers == [] and (empty.placement == current).all()


def test_time_series_heat_plans_like_its_sum():
    heat = skewed_heat()
    series = np.stack([np.floor(heat / 3), heat - np.floor(heat / 3)])  # [T=2, L, E]
    topo = Topology(8, 5)
    current = contiguous_placement(6, 32, 8, 5)
    a = make_plan(series, current, topo, get_policy("default"))
    b = make_plan(heat, current, topo, get_policy("default"))
    np.testing.assert_array_equal(a.placement, b.placement)
    assert [lp.before for lp in a.layers] == pytest.approx([lp.before for lp in b.layers])


def test_report_is_plain_and_msgpack_serializable():
    heat = skewed_heat()
    plan = make_plan(heat, contiguous_placement(6, 32, 8, 5), Topology(8, 5), get_policy("default"),
                     layers=[0, 2], bytes_per_expert=7)
    report = plan.to_report()
    assert msgpack.unpackb(msgpack.packb(report), strict_map_key=False) == report
    assert set(report) == {"policy", "mode", "seconds", "layers", "summary"}
    assert set(report["layers"][0]) == {"layer", "before", "after", "moves", "bytes", "change"}
    assert set(report["summary"]) == {"before", "after", "moves", "bytes"}
    assert set(report["summary"]["after"]) == {"mean", "p90", "max"}
    assert report["summary"]["moves"] == sum(lp.moves for lp in plan.layers)
    assert report["summary"]["bytes"] == 7 * report["summary"]["moves"]
    json.dumps(report)


def test_bad_arguments_and_bad_policies_raise_policy_error():
    heat = skewed_heat()
    topo = Topology(8, 5)
    current = contiguous_placement(6, 32, 8, 5)
    with pytest.raises(PlanError, match="min_gain"):
        make_plan(heat, current, topo, get_policy("default"), min_gain=-0.1)
    with pytest.raises(PlanError, match="bytes_per_expert"):
        make_plan(heat, current, topo, get_policy("default"), bytes_per_expert=-1)
    with pytest.raises(PolicyError, match="failed: RuntimeError: boom"):
        make_plan(heat, current, topo, Fixed(current, np.ones(6, bool), error=RuntimeError("boom")))
    dup = current.copy()
    dup[0, 0, 1] = dup[0, 0, 0]
    with pytest.raises(PolicyError, match=r"invalid placement.*two replicas"):
        make_plan(heat, current, topo, Fixed(dup, np.ones(6, bool)))
    with pytest.raises(PolicyError, match="change of shape"):
        make_plan(heat, current, topo, Fixed(current, np.ones(5, bool)))


def test_real_heat_plan_ep64(shared_data: Path):
    doc = json.loads((shared_data / "heat" / "deepseek_v3" / "decode_in1000out1000.json").read_text())
    heat = np.asarray(doc["logical_count"], dtype=np.float64)[3:]
    current = contiguous_placement(58, 256, 64, 5)
    plan = make_plan(heat, current, Topology(64, 5), get_policy("default"), bytes_per_expert=2**20)
    assert isinstance(plan, Plan)
    report = plan.to_report()
    assert report["summary"]["after"]["mean"] < 1.03 < report["summary"]["before"]["mean"]
    validate_placement(plan.placement, 256)
