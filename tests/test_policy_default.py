"""The default policy, the policy contract (Topology, Param, validation) and the registry."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import eplbctl.policies as registry
from eplbctl.metrics import device_loads, predicted_imbalance
from eplbctl.placement import contiguous_placement, replica_counts, validate_placement
from eplbctl.policies import Param, Policy, PolicyError, PolicyResult, Topology, get_policy, list_policies
from eplbctl.policies.base import check_heat, check_topology
from eplbctl.policies.default import DefaultPolicy

# DeepSeek EPLB README: 2 layers, 12 experts, 16 physical slots, 4 groups, 2 nodes, 8 GPUs.
GOLDEN_HEAT = np.array([
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
], dtype=np.float64)
GOLDEN_DEEPSEEK = np.array([  # DeepSeek's printed phy2log for that input
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]).reshape(2, 8, 2)
FLASHLB_HEAT = np.array([[600, 560, 120, 120, 20, 10, 10, 10]], dtype=np.float64)


def place(heat, topo: Topology, current=None) -> PolicyResult:
    heat = np.asarray(heat, dtype=np.float64)
    num_layers, num_experts = heat.shape[-2:]
    if current is None:
        current = contiguous_placement(num_layers, num_experts, topo.num_devices, topo.slots_per_device)
    return get_policy("default").place(heat, current, topo)


def check_invariants(result: PolicyResult, num_experts: int, topo: Topology) -> None:
    p = result.placement
    assert p.dtype == np.int64
    assert p.shape[1:] == (topo.num_devices, topo.slots_per_device)  # exact slots per device
    validate_placement(p, num_experts)  # ids in range, every expert >= 1 replica, no duplicate on a device
    counts = replica_counts(p, num_experts)
    assert (counts >= 1).all()
    assert (counts.sum(axis=1) == topo.num_physical).all()
    assert counts.max() <= topo.num_devices
    assert result.change.dtype == np.bool_ and result.change.shape == (p.shape[0],)


def load_real(path: Path) -> np.ndarray:
    """Tiny local loader: DeepSeek `logical_count` (leading all-zero dense rows dropped) or Qwen `counts`."""
    doc = json.loads(path.read_text())
    arr = np.asarray(doc["logical_count"] if "logical_count" in doc else doc["counts"], dtype=np.float64)
    nonzero = np.flatnonzero(arr.sum(axis=1) > 0)
    return arr[nonzero[0]:] if len(nonzero) else arr


# ---- golden examples ---------------------------------------------------------------------------

def test_deepseek_golden_hierarchical_equals_or_beats_deepseek():
    topo = Topology(num_devices=8, slots_per_device=2, num_nodes=2, num_groups=4)
    result = place(GOLDEN_HEAT, topo)
    check_invariants(result, 12, topo)
    assert result.mode == "hierarchical"
    ours = predicted_imbalance(result.placement, GOLDEN_HEAT)
    theirs = predicted_imbalance(GOLDEN_DEEPSEEK, GOLDEN_HEAT)
    assert (ours <= theirs + 1e-12).all(), (ours, theirs)
    # hierarchical: each node's devices hold whole groups (group = expert // 3), groups/nodes of them
    for layer in range(2):
        for node in range(2):
            groups = set((result.placement[layer, node * 4:(node + 1) * 4] // 3).ravel().tolist())
            assert len(groups) == 2


def test_deepseek_golden_global():
    topo = Topology(num_devices=8, slots_per_device=2)
    result = place(GOLDEN_HEAT, topo)
    check_invariants(result, 12, topo)
    assert result.mode == "global"
    assert (predicted_imbalance(result.placement, GOLDEN_HEAT)
            <= predicted_imbalance(GOLDEN_DEEPSEEK, GOLDEN_HEAT) + 1e-12).all()


def test_flashlb_example_no_duplicates_and_max_load():
    topo = Topology(num_devices=8, slots_per_device=2)
    result = place(FLASHLB_HEAT, topo)
    check_invariants(result, 8, topo)
    assert device_loads(result.placement, FLASHLB_HEAT).max() <= 232 + 1e-9


# ---- a plain-Python reference of the documented rules ------------------------------------------

def reference_global(heat: np.ndarray, n: int, s: int, stats: dict | None = None) -> np.ndarray:
    """Replicate by (heat/count desc, count asc, id asc); pack by (weight desc, id asc) onto
    (load asc, index asc) among devices with room not holding the expert; repair as documented."""
    e_count = len(heat)
    counts = [1] * e_count
    for _ in range(n * s - e_count):
        e = min((x for x in range(e_count) if counts[x] < n),
                key=lambda x: (-(heat[x] / counts[x]), counts[x], x))
        counts[e] += 1
    items = sorted(range(e_count), key=lambda x: (-(heat[x] / counts[x]), x))
    bins: list[list[int]] = [[] for _ in range(n)]
    wts: list[list[float]] = [[] for _ in range(n)]
    load = [0.0] * n
    for e in items:
        w = heat[e] / counts[e]
        for _ in range(counts[e]):
            ok = [b for b in range(n) if len(bins[b]) < s and e not in bins[b]]
            if ok:
                best = min(ok, key=lambda b: (load[b], b))
            else:
                if stats is not None:
                    stats["repairs"] = stats.get("repairs", 0) + 1
                dst = min((b for b in range(n) if len(bins[b]) < s), key=lambda b: (load[b], b))
                src = min((b for b in range(n) if len(bins[b]) == s and e not in bins[b]),
                          key=lambda b: (load[b], b))
                pick = min((i for i in range(s) if bins[src][i] not in bins[dst]),
                           key=lambda i: (wts[src][i], i))
                bins[dst].append(bins[src][pick])
                wts[dst].append(wts[src][pick])
                load[dst] += wts[src][pick]
                load[src] -= wts[src][pick]
                bins[src][pick], wts[src][pick] = bins[src][-1], wts[src][-1]
                bins[src].pop()
                wts[src].pop()
                best = src
            bins[best].append(e)
            wts[best].append(w)
            load[best] += w
    return np.array(bins, dtype=np.int64)


@pytest.mark.parametrize("seed", range(40))
def test_random_instances_match_reference_and_invariants(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    s = int(rng.integers(1, 6))
    e = int(rng.integers(s, n * s + 1))
    kind = seed % 4
    if kind == 0:
        heat = rng.integers(0, 4, size=(3, e)).astype(np.float64)  # many ties, some zeros
    elif kind == 1:
        heat = rng.zipf(1.5, size=(3, e)).clip(max=10**6).astype(np.float64)  # very skewed
    elif kind == 2:
        heat = np.zeros((3, e))
        heat[1, 0] = 1000.0  # one hot expert, rest zero
    else:
        heat = rng.random((3, e)) * 1000
    topo = Topology(n, s)
    result = place(heat, topo)
    check_invariants(result, e, topo)
    for layer in range(3):
        np.testing.assert_array_equal(result.placement[layer], reference_global(heat[layer], n, s))


@pytest.mark.parametrize("seed", range(20))
def test_random_hierarchical_instances_keep_groups_on_nodes(seed):
    rng = np.random.default_rng(100 + seed)
    nodes = int(rng.integers(1, 4))
    groups = nodes * int(rng.integers(1, 4))
    per_node = int(rng.integers(1, 4))
    s = int(rng.integers(1, 4))
    group_size = int(rng.integers(1, 5))
    e = groups * group_size
    if e // nodes < s:
        s = e // nodes
    n = nodes * per_node
    if e > n * s:
        n, per_node = nodes * -(-e // (nodes * s)), -(-e // (nodes * s))
    heat = rng.integers(0, 4, size=(3, e)).astype(np.float64) ** 3
    topo = Topology(n, s, num_nodes=nodes, num_groups=groups)
    result = place(heat, topo)
    check_invariants(result, e, topo)
    assert result.mode == "hierarchical"
    node_groups = result.placement.reshape(3, nodes, per_node * s) // group_size
    for layer in range(3):
        seen = [set(node_groups[layer, k].tolist()) for k in range(nodes)]
        assert all(len(g) == groups // nodes for g in seen)
        assert len(set().union(*seen)) == groups  # each group lives on exactly one node
    np.testing.assert_array_equal(result.placement, place(heat, topo).placement)


def test_repair_path_is_exercised_and_valid():
    # Sometimes every device with a free slot already holds the expert being packed: the packer must
    # move an item out of a full device (the repair), never place a duplicate.
    stats: dict = {}
    rng = np.random.default_rng(7)
    cases = [(3, 2, [[0.0, 0.0, 0.0]]), (3, 5, [[5.0, 3.0, 0.0, 0.0, 0.0, 0.0]])]
    for _ in range(300):
        n, s = int(rng.integers(2, 6)), int(rng.integers(2, 5))
        e = int(rng.integers(s, n * s + 1))
        cases.append((n, s, rng.integers(0, 3, size=(1, e)) * rng.choice([1, 100], size=(1, e))))
    for n, s, rows in cases:
        heat = np.asarray(rows, dtype=np.float64)
        e = heat.shape[1]
        topo = Topology(n, s)
        result = place(heat, topo)
        check_invariants(result, e, topo)
        np.testing.assert_array_equal(result.placement[0], reference_global(heat[0], n, s, stats))
    assert stats.get("repairs", 0) > 0


def test_deterministic_same_input_and_equal_inputs():
    rng = np.random.default_rng(3)
    heat = rng.integers(0, 5, size=(6, 48)).astype(np.float64)  # heavy ties
    topo = Topology(8, 7)
    a = place(heat, topo).placement
    b = place(heat.copy(), topo).placement
    c = place(np.asfortranarray(heat.astype(np.int32)), topo).placement
    split = np.stack([heat // 2, heat - heat // 2])  # [T=2, L, E] summing to the same window
    d = place(split, topo).placement
    for other in (b, c, d):
        np.testing.assert_array_equal(a, other)
    topo_h = Topology(8, 7, num_nodes=2, num_groups=8)
    np.testing.assert_array_equal(place(heat, topo_h).placement, place(split, topo_h).placement)


def test_zero_heat_layers_spread_redundancy_and_do_not_change():
    heat = np.zeros((2, 16))
    heat[1] = np.arange(16) + 1.0
    topo = Topology(8, 3)  # 24 slots, 8 redundant
    result = place(heat, topo)
    check_invariants(result, 16, topo)
    counts = replica_counts(result.placement, 16)
    assert counts[0].max() - counts[0].min() <= 1  # round-robin, not piled on one expert
    assert not result.change[0]  # imbalance 1.0 both ways
    assert np.isfinite(predicted_imbalance(result.placement, heat)).all()


def test_change_flag_follows_predicted_imbalance():
    heat = np.array([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    topo = Topology(4, 3)
    first = place(heat, topo)
    assert first.change[0]
    again = place(heat, topo, current=first.placement)
    assert not again.change[0]


def test_real_heat_deepseek_anchor_figures(shared_data):
    heat = load_real(shared_data / "heat" / "deepseek_v3" / "decode_in1000out1000.json")
    assert heat.shape == (58, 256)
    glob = place(heat, Topology(32, 9))
    assert predicted_imbalance(glob.placement, heat).mean() < 1.0075  # brief: 1.0069 (with duplicates)
    hier = place(heat, Topology(32, 9, num_nodes=4, num_groups=8))
    assert hier.mode == "hierarchical"
    assert predicted_imbalance(hier.placement, heat).mean() < 1.32  # brief: 1.317


@pytest.mark.parametrize("devices,physical", [(32, 288), (64, 320)])
def test_every_real_heat_file(shared_data, devices, physical):
    files = sorted((shared_data / "heat").glob("*/*.json"))
    assert files
    for path in files:
        heat = load_real(path)
        num_layers, num_experts = heat.shape
        topo = Topology(devices, physical // devices)
        start = contiguous_placement(num_layers, num_experts, devices, physical // devices)
        result = place(heat, topo, current=start)
        check_invariants(result, num_experts, topo)
        np.testing.assert_array_equal(result.placement, place(heat, topo, current=start).placement)
        before = predicted_imbalance(start, heat).mean()
        after = predicted_imbalance(result.placement, heat).mean()
        assert after < before, (path.name, before, after)


def test_runtime_58x256_on_ep64():
    rng = np.random.default_rng(0)
    heat = rng.zipf(1.3, size=(58, 256)).clip(max=10**6).astype(np.float64)
    topo = Topology(64, 5)
    current = contiguous_placement(58, 256, 64, 5)
    policy = get_policy("default")
    policy.place(heat, current, topo)  # warm (numba cache)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        policy.place(heat, current, topo)
        times.append(time.perf_counter() - t)
    assert min(times) < 0.05  # ~4 ms here; generous for shared CI machines


# ---- input validation --------------------------------------------------------------------------

@pytest.mark.parametrize("bad,word", [(np.nan, "finite"), (np.inf, "finite"), (-1.0, "negative")])
def test_bad_heat_rejected(bad, word):
    heat = np.ones((2, 8))
    heat[1, 3] = bad
    with pytest.raises(PolicyError, match=word):
        place(heat, Topology(4, 2))


def test_bad_heat_shape_and_current_rejected():
    with pytest.raises(PolicyError, match="heat must be"):
        check_heat(np.ones(8))
    with pytest.raises(PolicyError, match="current placement has shape"):
        get_policy("default").place(np.ones((2, 8)), contiguous_placement(3, 8, 4, 2), Topology(4, 2))


@pytest.mark.parametrize("topo,experts,msg", [
    (Topology(4, 2), 9, "do not fit"),
    (Topology(2, 5), 4, "at least 5 distinct experts"),
    (Topology(0, 2), 4, ">= 1"),
    (Topology(8, 2, num_nodes=2), 12, "needs both"),
    (Topology(8, 2, num_groups=4), 12, "needs both"),
    (Topology(8, 2, num_nodes=2, num_groups=5), 12, "equal groups"),
    (Topology(9, 2, num_nodes=3, num_groups=4), 12, "groups do not split evenly"),
    (Topology(9, 2, num_nodes=2, num_groups=4), 12, "devices do not split evenly"),
    (Topology(4, 5, num_nodes=4, num_groups=4), 12, "each node holds 3 experts"),
])
def test_topology_errors(topo, experts, msg):
    with pytest.raises(PolicyError, match=msg):
        check_topology(topo, experts)


def test_impossible_hierarchy_raises_instead_of_falling_back():
    with pytest.raises(PolicyError, match="hierarchical"):
        place(GOLDEN_HEAT, Topology(8, 2, num_nodes=2, num_groups=5))


# ---- registry and parameters -------------------------------------------------------------------

class Tunable(Policy):
    """A test policy with parameters."""

    name: ClassVar[str] = "tunable"
    params: ClassVar[dict[str, Param]] = {
        "depth": Param("depth", int, 2, "search depth", lambda v: None if v >= 1 else "must be >= 1"),
        "ratio": Param("ratio", float, 0.5, "threshold"),
        "fast": Param("fast", bool, False, "skip look-ahead"),
    }

    def place(self, heat, current, topo):
        return PolicyResult(np.asarray(current), np.zeros(np.asarray(current).shape[0], bool), "test")


def test_registry_and_list_policies():
    assert registry.REGISTRY["default"] is DefaultPolicy
    listed = {p["name"]: p for p in list_policies()}
    assert "default" in listed and listed["default"]["summary"]
    json.dumps(listed)  # plain types


def test_get_policy_errors_list_valid_names():
    with pytest.raises(PolicyError, match=r"unknown policy 'nope' \(valid: .*default"):
        get_policy("nope")
    with pytest.raises(PolicyError, match=r"has no parameter 'x' \(valid: none\)"):
        get_policy("default", {"x": "1"})


def test_params_parsed_and_validated(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "tunable", Tunable)
    pol = get_policy("tunable", {"depth": "4", "fast": "yes"})
    assert pol.values == {"depth": 4, "ratio": 0.5, "fast": True}
    with pytest.raises(PolicyError, match=r"parameter 'depth': expected int, got 'x'"):
        get_policy("tunable", {"depth": "x"})
    with pytest.raises(PolicyError, match=r"parameter 'depth'=0: must be >= 1"):
        get_policy("tunable", {"depth": "0"})
    with pytest.raises(PolicyError, match="expected true/false"):
        get_policy("tunable", {"fast": "maybe"})
    with pytest.raises(PolicyError, match=r"no parameter 'deep' \(valid: depth, fast, ratio\)"):
        get_policy("tunable", {"deep": "1"})
    listed = {p["name"]: p for p in list_policies()}["tunable"]
    assert listed["summary"] == "A test policy with parameters."
    assert listed["params"][0] == {"name": "depth", "type": "int", "default": 2, "help": "search depth"}


def test_entry_point_discovery(monkeypatch):
    class FakeEP:
        def __init__(self, name, obj):
            self.name, self._obj = name, obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    eps = [FakeEP("plugged", Tunable), FakeEP("broken", ImportError("x")), FakeEP("default", Tunable),
           FakeEP("notapolicy", object)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == "eplbctl.policies" else [])
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    registry._discover()
    assert registry.REGISTRY["plugged"] is Tunable
    assert registry.REGISTRY["default"] is DefaultPolicy  # built-ins are never shadowed
    assert "broken" not in registry.REGISTRY and "notapolicy" not in registry.REGISTRY
