"""Placement of logical experts on physical slots, and its validation.

Glossary (the brief's exact meanings):
  L  MoE layers          E  logical experts per layer
  N  devices (EP ranks)  S  slots per device
  P = N * S physical slots, R = P - E redundant slots.

A placement is ``phy2log[L, N, S]`` (int64): the logical expert held by slot s of device n.
Everything else (replica counts, log2phy) is derived from it, never stored beside it.
"""

from __future__ import annotations

import numpy as np


class PlacementError(ValueError):
    """A placement or a slot arithmetic that cannot be served."""


def slots_per_device(num_experts: int, num_devices: int, redundant: int) -> int:
    """S for E experts and R redundant slots on N devices; explains the smallest R that works."""
    if num_experts <= 0 or num_devices <= 0:
        raise PlacementError(f"experts and devices must be positive (got E={num_experts}, N={num_devices})")
    if redundant < 0:
        raise PlacementError(f"redundant slots must be >= 0 (got {redundant})")
    most = num_experts * (num_devices - 1)  # beyond it a device would hold two replicas of one expert
    if redundant > most:
        raise PlacementError(f"{redundant} redundant slots exceed the {most} that {num_experts} experts on "
                             f"{num_devices} devices can use (one replica of an expert per device)")
    total = num_experts + redundant
    if total % num_devices:
        smallest = redundant + (-total) % num_devices  # closed form: a huge R must not loop
        raise PlacementError(
            f"{num_experts} experts + {redundant} redundant slots do not divide over {num_devices} devices; "
            f"the smallest redundant count >= {redundant} that works is {smallest}"
        )
    return total // num_devices


def contiguous_placement(num_layers: int, num_experts: int, num_devices: int, slots: int) -> np.ndarray:
    """The naive start: physical slot p holds expert p % E.  -> phy2log [L, N, S]."""
    physical = num_devices * slots
    if physical < num_experts:
        raise PlacementError(f"{physical} slots cannot hold {num_experts} experts")
    row = (np.arange(physical, dtype=np.int64) % num_experts).reshape(num_devices, slots)
    placement = np.broadcast_to(row, (num_layers, num_devices, slots)).copy()
    validate_placement(placement, num_experts)
    return placement


def validate_placement(phy2log: np.ndarray, num_experts: int) -> None:
    """Raise PlacementError naming the first bad layer/device/slot; return None when servable."""
    arr = np.asarray(phy2log)
    if arr.ndim != 3:
        raise PlacementError(f"placement must be [layers, devices, slots], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PlacementError(f"placement must hold integer expert ids, got dtype {arr.dtype}")
    _, num_devices, slots = arr.shape
    if num_devices * slots < num_experts:
        raise PlacementError(f"{num_devices}x{slots} slots cannot hold {num_experts} experts")
    bad = np.argwhere((arr < 0) | (arr >= num_experts))
    if len(bad):
        layer, dev, slot = (int(x) for x in bad[0])
        raise PlacementError(
            f"layer {layer} device {dev} slot {slot}: expert id {int(arr[layer, dev, slot])} "
            f"out of range [0, {num_experts})"
        )
    # Two replicas of one expert on one device: sort each device's slots and look for equal neighbours.
    ordered = np.sort(arr, axis=2)
    dup = np.argwhere(ordered[:, :, 1:] == ordered[:, :, :-1])
    if len(dup):
        layer, dev, _ = (int(x) for x in dup[0])
        expert = int(ordered[layer, dev, dup[0][2]])
        slots_of = np.flatnonzero(arr[layer, dev] == expert).tolist()
        raise PlacementError(
            f"layer {layer} device {dev}: expert {expert} has two replicas on one device (slots {slots_of})"
        )
    counts = replica_counts(arr, num_experts)
    missing = np.argwhere(counts == 0)
    if len(missing):
        layer, expert = (int(x) for x in missing[0])
        raise PlacementError(f"layer {layer}: expert {expert} has no slot")


def replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """-> [L, E] int64: how many slots hold each logical expert."""
    arr = np.asarray(phy2log)
    num_layers = arr.shape[0]
    flat = arr.reshape(num_layers, -1)
    offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[:, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts).astype(np.int64)


def log2phy(phy2log: np.ndarray, num_experts: int, max_replicas: int | None = None) -> np.ndarray:
    """-> [L, E, max_replicas] int64 physical slot ids (device * S + slot), padded with -1.

    Replicas are listed in ascending physical order so every rank derives the same table.
    """
    arr = np.asarray(phy2log)
    num_layers = arr.shape[0]
    flat = arr.reshape(num_layers, -1)
    counts = replica_counts(arr, num_experts)
    width = int(counts.max()) if max_replicas is None else max_replicas
    if counts.max() > width:
        raise PlacementError(f"an expert has {int(counts.max())} replicas, more than the table's {width}")
    table = np.full((num_layers, num_experts, width), -1, dtype=np.int64)
    for layer in range(num_layers):
        order = np.argsort(flat[layer], kind="stable")  # physical ids grouped by expert, ascending
        experts = flat[layer][order]
        starts = np.concatenate(([0], np.cumsum(counts[layer])[:-1]))
        rank_in_expert = np.arange(len(order)) - starts[experts]
        table[layer, experts, rank_in_expert] = order
    return table


def moved_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """-> bool [L, N, S]: slots whose new expert its device did not hold before (weights must cross)."""
    old = np.asarray(old)
    new = np.asarray(new)
    if old.shape != new.shape:
        raise PlacementError(f"placements differ in shape: {old.shape} vs {new.shape}")
    # held[l, n, s] = new[l, n, s] is somewhere in old[l, n, :]
    held = (new[:, :, :, None] == old[:, :, None, :]).any(axis=3)
    return ~held


def count_moves(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """-> [L] int64 number of expert weight copies that must cross between devices."""
    return moved_slots(old, new).sum(axis=(1, 2)).astype(np.int64)


def device_of_slot(physical: np.ndarray, slots: int) -> np.ndarray:
    """Physical slot id -> device index."""
    return np.asarray(physical) // slots
