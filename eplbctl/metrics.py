"""Imbalance metrics, exactly as the brief defines them.

Imbalance of a layer = max device load / mean device load, computed per layer over devices.
Aggregation over layers (mean / p90 / max) happens only after the per-layer value.
A layer with zero load has predicted imbalance 1.0 by definition; one that recorded no token has no
measured imbalance (NaN, shown as "-"): no data is not a balanced layer.
"""

from __future__ import annotations

import numpy as np

from eplbctl.placement import replica_counts


def device_loads(phy2log: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Load model: an expert's heat is split evenly over its replicas.

    phy2log [L, N, S] int, heat [L, E] -> loads [L, N] float64.
    """
    phy2log = np.asarray(phy2log)
    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim != 2 or heat.shape[0] != phy2log.shape[0]:
        raise ValueError(f"heat {heat.shape} does not match placement {phy2log.shape}")
    outside = phy2log[(phy2log < 0) | (phy2log >= heat.shape[1])]
    if outside.size:  # replica_counts would fold it into the next layer's counts
        raise ValueError(f"placement holds expert id {int(outside[0])} outside the heat's "
                         f"{heat.shape[1]} experts")
    counts = replica_counts(phy2log, heat.shape[1])  # [L, E]
    orphan = np.argwhere((counts == 0) & (heat > 0))
    if len(orphan):  # its heat would vanish from every device
        layer, expert = (int(x) for x in orphan[0])
        raise ValueError(f"layer {layer}: expert {expert} has heat but no slot in the placement")
    per_replica = np.divide(heat, counts, out=np.zeros_like(heat), where=counts > 0)  # [L, E]
    slot_load = np.take_along_axis(per_replica, phy2log.reshape(phy2log.shape[0], -1), axis=1)
    return slot_load.reshape(phy2log.shape).sum(axis=2)


def imbalance_of_loads(loads: np.ndarray) -> np.ndarray:
    """loads [L, N] -> imbalance [L] (max / mean over devices; 1.0 for an all-zero layer)."""
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2:
        raise ValueError(f"loads must be [layers, devices], got shape {loads.shape}")
    mean = loads.mean(axis=1)
    peak = loads.max(axis=1)
    return np.divide(peak, mean, out=np.ones_like(mean), where=mean > 0)


def predicted_imbalance(phy2log: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Imbalance the load model predicts for a placement: [L]."""
    return imbalance_of_loads(device_loads(phy2log, heat))


def measured_imbalance(slot_counts: np.ndarray) -> np.ndarray:
    """Imbalance from recorded per-slot token counts [L, N, S] -> [L]; NaN where a layer recorded no
    token, since no data is not a balanced layer."""
    slot_counts = np.asarray(slot_counts, dtype=np.float64)
    if slot_counts.ndim != 3:
        raise ValueError(f"slot counts must be [layers, devices, slots], got shape {slot_counts.shape}")
    loads = slot_counts.sum(axis=2)
    out = imbalance_of_loads(loads)
    out[loads.sum(axis=1) == 0] = np.nan
    return out


def balancedness(imbalance: np.ndarray) -> np.ndarray:
    """The peers' figure: mean / max = 1 / imbalance."""
    return 1.0 / np.asarray(imbalance, dtype=np.float64)


def summarize_known(per_layer: np.ndarray) -> dict[str, float] | None:
    """summarize() over the layers that have a value (not NaN); None when none has."""
    values = np.asarray(per_layer, dtype=np.float64)
    values = values[~np.isnan(values)]
    return summarize(values) if values.size else None


def summarize(per_layer: np.ndarray) -> dict[str, float]:
    """Aggregate per-layer values: mean, p90 and max over layers."""
    values = np.asarray(per_layer, dtype=np.float64)
    if values.size == 0:
        return {"mean": 1.0, "p90": 1.0, "max": 1.0}
    return {
        "mean": float(values.mean()),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def logical_heat_from_slots(slot_counts: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-slot counts [L, N, S] -> per-logical-expert heat [L, E] through the placement in force."""
    slot_counts = np.asarray(slot_counts)
    phy2log = np.asarray(phy2log)
    if slot_counts.shape != phy2log.shape:
        raise ValueError(f"slot counts {slot_counts.shape} do not match placement {phy2log.shape}")
    num_layers = phy2log.shape[0]
    offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[:, None]
    idx = (phy2log.reshape(num_layers, -1) + offsets).ravel()
    heat = np.bincount(idx, weights=slot_counts.reshape(-1).astype(np.float64),
                       minlength=num_layers * num_experts)
    return heat.reshape(num_layers, num_experts)
