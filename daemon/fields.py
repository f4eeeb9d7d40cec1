"""Fields of control requests, checked as docs/protocol.md says: ill-typed 400, typed but invalid 422."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eplbctl.policies import get_policy
from eplbctl.policies.base import PolicyError
from eplbctl.protocol import RequestError


@dataclass(frozen=True)
class RebalanceFields:
    policy: str
    params: dict[str, str]
    threshold: float
    min_gain: float
    layers: list[int] | None   # None: auto, the daemon picks the layers above `threshold`


def rebalance_fields(content: dict, num_layers: int, policy: str, threshold: float,
                     min_gain: float) -> RebalanceFields:
    """A rebalance request's planning fields, the daemon's settings filling in the missing ones."""
    policy = str_field(content, "policy") or policy
    params = content.get("params") or {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise RequestError(400, "params must be a map of strings")
    try:
        get_policy(policy, params)
    except PolicyError as exc:
        raise RequestError(422, str(exc)) from None
    if content.get("threshold") is not None:
        threshold = threshold_value(content["threshold"])
    if content.get("min_gain") is not None:
        min_gain = min_gain_value(content["min_gain"])
    layers = None
    if not content.get("auto"):
        layers = layer_list(content.get("layers"), num_layers)
        if not layers:
            raise RequestError(422, "no layers given: use layers or auto")
    return RebalanceFields(policy, params, threshold, min_gain, layers)


def str_field(content: dict, key: str) -> str | None:
    value = content.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(400, f"{key} must be a string")
    return value


def threshold_value(value: Any) -> float:
    return _number_at_least(value, 1.0, "threshold must be a number >= 1.0 (imbalance is max/mean)")


def min_gain_value(value: Any) -> float:
    return _number_at_least(value, 0.0, "min_gain must be a number >= 0 (imbalance improvement)")


def _number_at_least(value: Any, low: float, rule: str) -> float:
    """A finite JSON number >= low (true/false are not numbers here), else 422 stating `rule`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value < low:
        raise RequestError(422, f"{rule}, got {value!r}")
    return float(value)


def layer_list(value: Any, num_layers: int) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RequestError(400, "layers must be a list of integers")
    bad = [v for v in value if not 0 <= v < num_layers]
    if bad:
        raise RequestError(422, f"layer {bad[0]} out of range 0-{num_layers - 1}")
    return sorted(set(value))
