"""Placement model: validation messages, slot arithmetic, replica counts, log2phy, moves."""

from __future__ import annotations

import numpy as np
import pytest

from eplbctl.placement import (
    PlacementError,
    contiguous_placement,
    count_moves,
    device_of_slot,
    log2phy,
    moved_slots,
    replica_counts,
    slots_per_device,
    validate_placement,
)


def good() -> np.ndarray:
    """2 layers, 4 experts, 3 devices x 2 slots (2 redundant)."""
    return np.array([[[0, 1], [2, 3], [0, 2]],
                     [[3, 2], [1, 0], [1, 3]]], dtype=np.int64)


def test_valid_placement_passes() -> None:
    validate_placement(good(), 4)


def test_missing_expert_names_layer_and_expert() -> None:
    bad = good()
    bad[1, 1, 1] = 2  # layer 1 now has no 0 and its device 1 holds [1, 2]
    with pytest.raises(PlacementError, match=r"^layer 1: expert 0 has no slot$"):
        validate_placement(bad, 4)


def test_expert_id_out_of_range_names_layer_device_slot() -> None:
    bad = good()
    bad[1, 2, 1] = 7
    with pytest.raises(PlacementError, match=r"^layer 1 device 2 slot 1: expert id 7 out of range \[0, 4\)$"):
        validate_placement(bad, 4)


def test_negative_expert_id_rejected() -> None:
    bad = good()
    bad[0, 0, 0] = -1
    with pytest.raises(PlacementError, match="layer 0 device 0 slot 0: expert id -1"):
        validate_placement(bad, 4)


def test_duplicate_on_one_device_names_layer_device_and_slots() -> None:
    bad = good()
    bad[0, 2] = [3, 3]
    with pytest.raises(PlacementError, match=r"layer 0 device 2: expert 3 has two replicas on one device "
                                             r"\(slots \[0, 1\]\)"):
        validate_placement(bad, 4)


@pytest.mark.parametrize("shape", [(4,), (2, 6), (1, 2, 3, 1)])
def test_wrong_shape_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(PlacementError, match=r"placement must be \[layers, devices, slots\], got shape"):
        validate_placement(np.zeros(shape, dtype=np.int64), 4)


def test_float_ids_rejected() -> None:
    with pytest.raises(PlacementError, match="integer expert ids"):
        validate_placement(good().astype(float), 4)


def test_too_few_slots_rejected() -> None:
    with pytest.raises(PlacementError, match="cannot hold 8 experts"):
        validate_placement(good(), 8)


def test_messages_are_one_line() -> None:
    bad = good()
    bad[0, 2] = [3, 3]
    with pytest.raises(PlacementError) as info:
        validate_placement(bad, 4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("experts", "devices", "redundant", "slots"),
                         [(256, 32, 32, 9), (256, 32, 0, 8), (256, 64, 64, 5), (64, 32, 32, 3)])
def test_slots_per_device(experts: int, devices: int, redundant: int, slots: int) -> None:
    assert slots_per_device(experts, devices, redundant) == slots


@pytest.mark.parametrize(("experts", "devices", "redundant", "smallest"),
                         [(256, 32, 30, 32), (10, 4, 1, 2), (10, 4, 3, 6), (60, 8, 0, 4), (256, 64, 1, 64)])
def test_indivisible_slots_message_gives_smallest_redundant(
        experts: int, devices: int, redundant: int, smallest: int) -> None:
    expected = f"smallest redundant count >= {redundant} that works is {smallest}$"
    with pytest.raises(PlacementError, match=expected):
        slots_per_device(experts, devices, redundant)
    assert slots_per_device(experts, devices, smallest) == (experts + smallest) // devices


def test_negative_redundant_and_nonpositive_sizes_rejected() -> None:
    with pytest.raises(PlacementError, match="redundant slots must be >= 0"):
        slots_per_device(8, 2, -1)
    with pytest.raises(PlacementError, match="must be positive"):
        slots_per_device(8, 0, 0)


def test_contiguous_placement_and_replica_counts() -> None:
    placement = contiguous_placement(3, 256, 32, 9)  # 288 slots, 32 redundant
    assert placement.shape == (3, 32, 9)
    counts = replica_counts(placement, 256)
    assert counts.shape == (3, 256)
    assert (counts >= 1).all()
    assert (counts.sum(axis=1) == 288).all()
    assert (counts[:, :32] == 2).all() and (counts[:, 32:] == 1).all()


def test_replica_counts_per_layer_do_not_leak() -> None:
    counts = replica_counts(good(), 4)
    assert counts.tolist() == [[2, 1, 2, 1], [1, 2, 1, 2]]


def test_log2phy_lists_ascending_physical_slots_padded() -> None:
    table = log2phy(good(), 4)
    assert table.shape == (2, 4, 2)
    # layer 0 physical: 0->0, 1->1, 2->2, 3->3, 4->0, 5->2
    assert table[0].tolist() == [[0, 4], [1, -1], [2, 5], [3, -1]]
    assert table[1].tolist() == [[3, -1], [2, 4], [1, -1], [0, 5]]
    for layer in range(2):
        flat = good()[layer].ravel()
        for expert in range(4):
            slots = table[layer, expert][table[layer, expert] >= 0]
            assert (flat[slots] == expert).all()
    assert device_of_slot(table[0, 0], 2).tolist() == [0, 2]


def test_log2phy_wider_table_and_too_narrow_rejected() -> None:
    assert log2phy(good(), 4, max_replicas=3).shape == (2, 4, 3)
    with pytest.raises(PlacementError, match="more than the table's 1"):
        log2phy(good(), 4, max_replicas=1)


def test_moves_count_only_experts_new_to_their_device() -> None:
    old = good()
    new = old.copy()
    new[0, 0] = [1, 0]  # swapped within device 0: no weights cross
    assert count_moves(old, new).tolist() == [0, 0]
    new[0, 2] = [1, 2]  # device 2 gets expert 1 (new to it) in slot 0
    new[1, 0] = [0, 1]  # device 0 of layer 1 gets two new experts
    assert count_moves(old, new).tolist() == [1, 2]
    assert moved_slots(old, new)[0, 2].tolist() == [True, False]


def test_moves_shape_mismatch_rejected() -> None:
    with pytest.raises(PlacementError, match="differ in shape"):
        count_moves(good(), good()[:1])

def test_huge_redundant_count_is_refused_at_once_not_looped() -> None:
    with pytest.raises(PlacementError, match="exceed the 768 that 256 experts on 4 devices can use"):
        slots_per_device(256, 4, 99999999999999999999)
    with pytest.raises(PlacementError, match="exceed the 0 that"):
        slots_per_device(8, 1, 1)
    assert slots_per_device(256, 4, 768) == 256  # the most: every device holds every expert once
