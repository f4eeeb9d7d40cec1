"""Placement policies: the registry (its keys double as click Choice values) and plug-in discovery.

Outside packages add a policy with an entry point in the group ``eplbctl.policies`` whose value is a
``Policy`` subclass, e.g. ``[project.entry-points."eplbctl.policies"] mine = "pkg.mod:MyPolicy"``.
Built-in names cannot be shadowed by a plug-in.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from eplbctl.policies.base import Param, Policy, PolicyError, PolicyResult, Topology
from eplbctl.policies.default import DefaultPolicy
from eplbctl.policies.exact import ExactPolicy
from eplbctl.policies.flashlb import FlashLBPolicy
from eplbctl.policies.random import RandomPolicy
from eplbctl.policies.swift import SwiftPolicy

ENTRY_POINT_GROUP = "eplbctl.policies"

REGISTRY: dict[str, type[Policy]] = {
    DefaultPolicy.name: DefaultPolicy,
    ExactPolicy.name: ExactPolicy,
    FlashLBPolicy.name: FlashLBPolicy,
    RandomPolicy.name: RandomPolicy,
    SwiftPolicy.name: SwiftPolicy,
}


def _discover() -> None:
    """Add entry-point policies to REGISTRY; a broken plug-in is skipped, never fatal to the CLI."""
    try:
        found = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution's metadata must not break every command
        return
    for ep in sorted(found, key=lambda e: e.name):
        if ep.name in REGISTRY:
            continue
        try:
            cls = ep.load()
        except Exception:
            continue
        if isinstance(cls, type) and issubclass(cls, Policy):
            REGISTRY[ep.name] = cls


_discover()


def get_policy(name: str, params: dict[str, str] | None = None) -> Policy:
    """A configured policy from its registry name and string parameters (as typed on a command line)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise PolicyError(f"unknown policy {name!r} (valid: {', '.join(sorted(REGISTRY))})")
    typed: dict[str, Any] = {}
    for key, text in (params or {}).items():
        spec = cls.params.get(key)
        if spec is None:
            valid = ", ".join(sorted(cls.params)) or "none"
            raise PolicyError(f"policy {name!r} has no parameter {key!r} (valid: {valid})")
        typed[key] = spec.parse(text)
    return cls(**typed)


def list_policies() -> list[dict[str, Any]]:
    """[{name, summary, params: [{name, type, default, help}]}] sorted by name, plain types only."""
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        summary = cls.summary or (cls.__doc__ or "").strip().split("\n")[0]
        params = [
            {"name": p.name, "type": p.type.__name__, "default": p.default, "help": p.help}
            for p in cls.params.values()
        ]
        out.append({"name": name, "summary": summary, "params": params})
    return out


__all__ = [
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "Param",
    "Policy",
    "PolicyError",
    "PolicyResult",
    "Topology",
    "get_policy",
    "list_policies",
]
