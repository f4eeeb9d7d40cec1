"""Metrics exactly as the brief defines them: imbalance per layer over devices, then aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from eplbctl.metrics import (
    balancedness,
    device_loads,
    imbalance_of_loads,
    logical_heat_from_slots,
    measured_imbalance,
    predicted_imbalance,
    summarize,
    summarize_known,
)
from eplbctl.placement import contiguous_placement


def test_imbalance_is_per_layer_over_devices_never_over_layers() -> None:
    # 2 layers x 2 devices, each layer's devices carry [100, 200]: max/mean = 200/150 per layer.
    # Computed over layers (the wrong axis) every device would look perfectly balanced (1.0).
    loads = np.array([[100.0, 200.0], [100.0, 200.0]])
    values = imbalance_of_loads(loads)
    assert values.shape == (2,)
    assert values == pytest.approx([4 / 3, 4 / 3])
    assert not np.allclose(values, 1.0)


def test_predicted_imbalance_two_layers_two_devices() -> None:
    placement = np.array([[[0], [1]], [[0], [1]]])  # 2 layers, 2 devices x 1 slot, 2 experts
    heat = np.array([[100.0, 200.0], [100.0, 200.0]])
    assert device_loads(placement, heat).tolist() == [[100.0, 200.0], [100.0, 200.0]]
    assert predicted_imbalance(placement, heat) == pytest.approx([1.3333333, 1.3333333])


def test_zero_heat_layer_has_imbalance_one_never_nan() -> None:
    placement = contiguous_placement(2, 4, 2, 2)
    heat = np.array([[0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 1.0]])
    values = predicted_imbalance(placement, heat)
    assert values[0] == 1.0
    assert not np.isnan(values).any()
    assert balancedness(values)[0] == 1.0


def test_a_layer_that_recorded_no_token_has_no_measured_imbalance_not_a_perfect_one() -> None:
    counts = np.zeros((2, 2, 2))
    counts[1] = [[3.0, 1.0], [2.0, 2.0]]
    measured = measured_imbalance(counts)
    assert np.isnan(measured[0]) and measured[1] == 1.0
    assert summarize_known(measured) == {"mean": 1.0, "p90": 1.0, "max": 1.0}
    assert summarize_known(measured[:1]) is None


def test_heat_split_evenly_over_replicas() -> None:
    placement = np.array([[[0, 1], [0, 2]]])  # expert 0 on both devices
    heat = np.array([[600.0, 100.0, 300.0]])
    assert device_loads(placement, heat).tolist() == [[400.0, 600.0]]
    assert predicted_imbalance(placement, heat)[0] == pytest.approx(1.2)


def test_measured_imbalance_uses_recorded_slot_counts() -> None:
    counts = np.array([[[10.0, 0.0], [30.0, 0.0]]])  # replica selection was not an even split
    assert measured_imbalance(counts)[0] == pytest.approx(1.5)


def test_balancedness_is_reciprocal() -> None:
    assert balancedness(np.array([2.0, 1.25])) == pytest.approx([0.5, 0.8])


def test_summarize_mean_p90_max_over_layers() -> None:
    values = np.arange(1, 11, dtype=float)  # 1..10
    summary = summarize(values)
    assert summary == {"mean": 5.5, "p90": pytest.approx(9.1), "max": 10.0}
    assert summarize(np.array([])) == {"mean": 1.0, "p90": 1.0, "max": 1.0}


def test_logical_heat_from_slots_sums_replicas() -> None:
    placement = np.array([[[0, 1], [0, 2]]])
    counts = np.array([[[7.0, 3.0], [5.0, 2.0]]])
    assert logical_heat_from_slots(counts, placement, 3).tolist() == [[12.0, 3.0, 2.0]]
    with pytest.raises(ValueError, match="do not match"):
        logical_heat_from_slots(counts[:, :1], placement, 3)


def test_wrong_shapes_rejected_with_value_error() -> None:
    with pytest.raises(ValueError, match="loads must be"):
        imbalance_of_loads(np.ones(3))
    with pytest.raises(ValueError, match="does not match placement"):
        device_loads(np.zeros((2, 1, 1), dtype=int), np.ones((3, 1)))
    with pytest.raises(ValueError, match="slot counts must be"):
        measured_imbalance(np.ones((2, 2)))


def test_device_loads_rejects_expert_id_beyond_heat() -> None:
    # Without the check, id 2 of layer 0 was counted as expert 0 of layer 1 (then IndexError).
    placement = np.array([[[0], [2]], [[0], [1]]])
    with pytest.raises(ValueError, match="expert id 2 outside the heat's 2 experts"):
        device_loads(placement, np.ones((2, 2)))


def test_device_loads_rejects_heat_of_expert_without_slot() -> None:
    # Heat of an expert with no replica used to vanish, making the layer look better than it is.
    placement = np.array([[[0], [1]]])
    heat = np.array([[1.0, 1.0, 50.0]])
    with pytest.raises(ValueError, match="layer 0: expert 2 has heat but no slot"):
        device_loads(placement, heat)
