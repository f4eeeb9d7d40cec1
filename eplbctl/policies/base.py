"""The policy interface: topology, parameters, results, and input validation.

Glossary (the brief's exact meanings):
  L  MoE layers          E  logical experts per layer     T  episodes / steps of a heat series
  N  devices (EP ranks)  S  slots per device              P = N * S physical slots, R = P - E
  heat     [L, E] window sum, or [T, L, E] time series (policies that ignore time sum over T)
  phy2log  [L, N, S] int64: the logical expert held by slot s of device n

A policy is a class with one public entry point, ``place(heat, current, topo) -> PolicyResult``.
Everything it is handed has passed ``check_inputs``; everything it returns must pass ``check_result``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from eplbctl.placement import PlacementError, validate_placement


class PolicyError(ValueError):
    """A policy, its parameters, its inputs or its topology cannot be used; the message is one line."""


@dataclass(frozen=True)
class Topology:
    num_devices: int
    slots_per_device: int
    num_nodes: int | None = None  # hierarchical when nodes and groups are given
    num_groups: int | None = None  # expert groups (DeepSeek's n_group)

    @property
    def num_physical(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def hierarchical(self) -> bool:
        return self.num_nodes is not None or self.num_groups is not None


def check_topology(topo: Topology, num_experts: int) -> None:
    """Raise PolicyError unless E experts can be served on this topology (and its hierarchy, if asked)."""
    n, s = topo.num_devices, topo.slots_per_device
    if n < 1 or s < 1:
        raise PolicyError(f"devices and slots per device must be >= 1 (got N={n}, S={s})")
    if num_experts < 1:
        raise PolicyError(f"a layer needs at least one expert (got E={num_experts})")
    if num_experts > n * s:
        raise PolicyError(f"{num_experts} experts do not fit in {n} devices x {s} slots = {n * s} slots")
    if num_experts < s:
        raise PolicyError(
            f"{s} slots per device need at least {s} distinct experts (got E={num_experts}); "
            "two replicas of one expert on one device are never placed"
        )
    if not topo.hierarchical:
        return
    nodes, groups = topo.num_nodes, topo.num_groups
    if nodes is None or groups is None:
        raise PolicyError("hierarchical placement needs both a node count and a group count")
    if nodes < 1 or groups < 1:
        raise PolicyError(f"nodes and groups must be >= 1 (got nodes={nodes}, groups={groups})")
    if num_experts % groups:
        raise PolicyError(f"hierarchical: {num_experts} experts do not split into {groups} equal groups")
    if groups % nodes:
        raise PolicyError(f"hierarchical: {groups} groups do not split evenly over {nodes} nodes")
    if n % nodes:
        raise PolicyError(f"hierarchical: {n} devices do not split evenly over {nodes} nodes")
    if num_experts // nodes < s:
        raise PolicyError(
            f"hierarchical: each node holds {num_experts // nodes} experts, fewer than its "
            f"{s} slots per device; use fewer nodes or global placement"
        )


def window_heat(heat: np.ndarray) -> np.ndarray:
    """[L, E] or [T, L, E] -> [L, E] float64 window heat (sum over T), after validation."""
    arr = check_heat(heat)
    return arr.sum(axis=0) if arr.ndim == 3 else arr


def check_heat(heat: np.ndarray) -> np.ndarray:
    """-> heat as float64 [L, E] or [T, L, E]; PolicyError on a bad shape, NaN/inf or negative count."""
    arr = np.asarray(heat, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise PolicyError(
            f"heat must be [layers, experts] or [steps, layers, experts], got shape {arr.shape}"
        )
    if arr.size == 0:
        raise PolicyError(f"heat is empty (shape {arr.shape})")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        raise PolicyError(f"heat at index {tuple(int(i) for i in bad[0])} is not a finite number")
    neg = np.argwhere(arr < 0)
    if len(neg):
        idx = tuple(int(i) for i in neg[0])
        raise PolicyError(f"heat at index {idx} is negative ({arr[idx]:g})")
    return arr


def check_inputs(heat: np.ndarray, current: np.ndarray, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Validate (heat, current, topo) together -> (heat float64 as given, current int64 [L, N, S])."""
    arr = check_heat(heat)
    num_layers, num_experts = arr.shape[-2:]
    check_topology(topo, num_experts)
    cur = np.asarray(current)
    expected = (num_layers, topo.num_devices, topo.slots_per_device)
    if cur.shape != expected:
        raise PolicyError(
            f"current placement has shape {cur.shape}, expected {expected} from heat and topology"
        )
    try:
        validate_placement(cur, num_experts)
    except PlacementError as exc:
        raise PolicyError(f"current placement: {exc}") from None
    return arr, cur.astype(np.int64, copy=False)


@dataclass
class PolicyResult:
    placement: np.ndarray  # [L, N, S] int64, validated
    change: np.ndarray  # [L] bool: the policy thinks this layer is worth changing
    mode: str  # "global" | "hierarchical" | policy-specific, said to the user


def check_result(
    result: PolicyResult, num_experts: int, shape: tuple[int, int, int], name: str
) -> PolicyResult:
    """Validate a policy's answer (also one from an outside plug-in) -> a normalized PolicyResult."""
    if not isinstance(result, PolicyResult):
        raise PolicyError(f"policy {name!r} returned {type(result).__name__}, not a PolicyResult")
    placement = np.asarray(result.placement)
    if placement.shape != shape:
        raise PolicyError(
            f"policy {name!r} returned a placement of shape {placement.shape}, expected {shape}"
        )
    try:
        validate_placement(placement, num_experts)
    except PlacementError as exc:
        raise PolicyError(f"policy {name!r} returned an invalid placement: {exc}") from None
    change = np.asarray(result.change)
    if change.shape != (shape[0],) or change.dtype != np.bool_:
        raise PolicyError(f"policy {name!r} returned change of shape {change.shape} {change.dtype}, "
                          f"expected ({shape[0]},) bool")
    return PolicyResult(placement.astype(np.int64, copy=False), change, str(result.mode))


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # compiled kernels take int params as int64
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One tunable of a policy. ``validate(value)`` returns None when fine, else why (a short phrase)."""

    name: str
    type: type  # int | float | str | bool
    default: Any
    help: str
    validate: Callable[[Any], str | None] | None = None

    def parse(self, text: str) -> Any:
        """A command-line string -> a checked value of this parameter's type."""
        raw = str(text).strip()
        if self.type is bool:
            if raw.lower() not in _TRUE | _FALSE:
                raise PolicyError(f"parameter {self.name!r}: expected true/false, got {text!r}")
            return self.check(raw.lower() in _TRUE)
        try:
            value = self.type(raw)
        except ValueError:
            kind = self.type.__name__
            raise PolicyError(f"parameter {self.name!r}: expected {kind}, got {text!r}") from None
        return self.check(value)

    def check(self, value: Any) -> Any:
        """Check an already-typed value (int is accepted for float) -> the value."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise PolicyError(f"parameter {self.name!r}: expected {self.type.__name__}, got {value!r}")
        if self.type is float and not np.isfinite(value):
            raise PolicyError(f"parameter {self.name!r}: expected a finite number, got {value!r}")
        if self.type is int and not _INT64_MIN <= value <= _INT64_MAX:
            raise PolicyError(f"parameter {self.name!r}: {value} is too large (at most {_INT64_MAX}, a 64-bit "
                              "integer)" if value > 0 else f"parameter {self.name!r}: {value} is too small "
                              f"(at least {_INT64_MIN}, a 64-bit integer)")
        reason = self.validate(value) if self.validate is not None else None
        if reason:
            raise PolicyError(f"parameter {self.name!r}={value!r}: {reason}")
        return value


class Policy(ABC):
    """A placement policy. Subclasses set ``name``, ``summary``, ``params`` and implement ``place``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise PolicyError(f"policy {self.name!r} has no parameter {unknown[0]!r} (valid: {valid})")
        self.values: dict[str, Any] = {
            key: spec.check(values[key]) if key in values else spec.default
            for key, spec in self.params.items()
        }

    @abstractmethod
    def place(self, heat: np.ndarray, current: np.ndarray, topo: Topology) -> PolicyResult:
        """heat [L, E] or [T, L, E], current [L, N, S] -> PolicyResult for the same L layers."""
