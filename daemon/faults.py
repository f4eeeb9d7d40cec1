"""Fault injection for the simulated deployment, so the failure paths are tested with real processes.

A spec is `kind[:key=value...]`, given with `eplbd sim --fault SPEC` (repeatable) or the
`EPLBD_FAULT` environment variable (comma-separated):

  corrupt:rank=R:layer=L    rank R flips one value of what it received for layer L (before verify)
  kill:rank=R:layer=L       rank R exits right after launching the transfer of layer L
  hang:rank=R:layer=L       rank R stops answering right after launching the transfer of layer L
  policy-raise[:times=K]    the next K plans raise (default 1)
  policy-hang[:times=K]     the next K plans never return
  policy-crash[:times=K]    the next K planner processes die
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

KINDS = ("corrupt", "kill", "hang", "policy-raise", "policy-hang", "policy-crash")


class FaultSpecError(ValueError):
    pass


@dataclass
class Fault:
    kind: str
    rank: int | None = None
    layer: int | None = None
    times: int = 1


def parse_fault(spec: str) -> Fault:
    kind, *pairs = spec.strip().split(":")
    if kind not in KINDS:
        raise FaultSpecError(f"unknown fault {kind!r} (one of {', '.join(KINDS)})")
    values: dict[str, int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ("rank", "layer", "times") or not value.lstrip("-").isdigit():
            raise FaultSpecError(f"bad fault field {pair!r} in {spec!r} (rank=R, layer=L, times=K)")
        values[key] = int(value)
    fault = Fault(kind, values.get("rank"), values.get("layer"), values.get("times", 1))
    if kind in ("corrupt", "kill", "hang") and (fault.rank is None or fault.layer is None):
        raise FaultSpecError(f"fault {kind} needs rank=R and layer=L")
    return fault


@dataclass
class Faults:
    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def from_specs(cls, specs: list[str]) -> Faults:
        env = [s for s in os.environ.get("EPLBD_FAULT", "").split(",") if s.strip()]
        return cls([parse_fault(s) for s in [*specs, *env]])

    def _take(self, kind: str, rank: int | None = None, layer: int | None = None) -> bool:
        for f in self.faults:
            if f.kind == kind and f.times > 0 and (f.rank is None or f.rank == rank) \
                    and (f.layer is None or f.layer == layer):
                f.times -= 1
                return True
        return False

    def after_launch(self, rank: int, layer: int, engine: Any) -> None:
        if self._take("kill", rank, layer):
            os._exit(17)
        if self._take("hang", rank, layer):
            time.sleep(10**6)
        if self._take("corrupt", rank, layer):
            engine.corrupt_next = True

    def policy_fault(self) -> str | None:
        for kind in ("policy-raise", "policy-hang", "policy-crash"):
            if self._take(kind):
                return kind.removeprefix("policy-")
        return None

    @property
    def specs(self) -> list[str]:
        return [f"{f.kind}" + "".join(f":{k}={v}" for k, v in
                (("rank", f.rank), ("layer", f.layer), ("times", f.times)) if v is not None)
                for f in self.faults]
