"""Fault injection for the simulated deployment, so the failure paths are tested with real processes,
and the blame for a failure: which rank caused it, and which only gave up on that rank.

A spec is `kind[:key=value...]`, given with `eplbd sim --fault SPEC` (repeatable) or the
`EPLBD_FAULT` environment variable (comma-separated):

  corrupt:rank=R:layer=L    rank R flips one value of what it received for layer L (before verify;
                            nothing, if R receives nothing for L)
  kill:rank=R:layer=L       rank R exits once the first batch of layer L's transfer is posted
  hang:rank=R:layer=L       rank R stops answering once the first batch of layer L's transfer is posted
  policy-raise[:times=K]    the next K plans raise (default 1)
  policy-hang[:times=K]     the next K plans never return
  policy-crash[:times=K]    the next K planner processes die
"""

from __future__ import annotations

import os
import re
import signal
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
        if key in values:  # which one was meant? refuse rather than guess
            raise FaultSpecError(f"{key} given twice in {spec!r}")
        values[key] = int(value)
    fault = Fault(kind, values.get("rank"), values.get("layer"), values.get("times", 1))
    if kind in ("corrupt", "kill", "hang") and (fault.rank is None or fault.layer is None):
        raise FaultSpecError(f"fault {kind} needs rank=R and layer=L")
    # a policy fault is taken without a rank or layer, so one that names them would never fire
    if kind.startswith("policy-") and (fault.rank is not None or fault.layer is not None):
        raise FaultSpecError(f"fault {kind} takes only times=K, got {spec!r}")
    if fault.times < 1:
        raise FaultSpecError(f"times must be at least 1 in {spec!r}")
    return fault


def env_specs() -> list[str]:
    return [s for s in os.environ.get("EPLBD_FAULT", "").split(",") if s.strip()]


def check_faults(specs: list[str], ranks: int, layers: int) -> None:
    """FaultSpecError (one line) for a spec, given or in EPLBD_FAULT, that is malformed or names a rank
    or layer the deployment does not have: such a fault would silently never fire."""
    for source, spec in [*(("--fault", s) for s in specs), *(("EPLBD_FAULT", s) for s in env_specs())]:
        try:
            fault = parse_fault(spec)
        except FaultSpecError as exc:
            raise FaultSpecError(f"{source}: {exc}") from None
        if fault.rank is not None and not 0 <= fault.rank < ranks:
            raise FaultSpecError(f"{source} {spec}: rank {fault.rank} is not in 0-{ranks - 1} (--ranks {ranks})")
        if fault.layer is not None and not 0 <= fault.layer < layers:
            raise FaultSpecError(f"{source} {spec}: layer {fault.layer} is not in 0-{layers - 1} "
                                 f"(the deployment has {layers} MoE layers)")


@dataclass
class Faults:
    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def from_specs(cls, specs: list[str]) -> Faults:
        return cls([parse_fault(s) for s in [*specs, *env_specs()]])

    def _take(self, kind: str, rank: int | None = None, layer: int | None = None) -> bool:
        for f in self.faults:
            if f.kind == kind and f.times > 0 and (f.rank is None or f.rank == rank) \
                    and (f.layer is None or f.layer == layer):
                f.times -= 1
                return True
        return False

    def before_launch(self, rank: int, layer: int, staged: Any) -> None:
        if self._take("corrupt", rank, layer):
            staged.corrupt = True          # the engine flips a received value before verifying

    def after_launch(self, rank: int, layer: int, posted: Any) -> None:
        """Kill or hang once the layer's first batch is out (`posted`, an Event), i.e. mid-transfer."""
        if self._take("kill", rank, layer):
            posted.wait(10)
            os._exit(17)
        if self._take("hang", rank, layer):
            posted.wait(10)
            time.sleep(10**6)

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


# ---- blame --------------------------------------------------------------------------------------

_PEER_LOSS = re.compile(r"timed out|timeout|closed by peer|connection reset|broken pipe|connection refused", re.I)


def short_error(exc: BaseException) -> str:
    """One readable line from a collective's error (gloo prefixes a source path and adds a pep talk)."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0].strip() or type(exc).__name__


def lost_peer(exc: BaseException) -> bool:
    """A collective or transfer failed because a peer died, hung or left, not by this rank's own error."""
    return isinstance(exc, RuntimeError | OSError) and bool(_PEER_LOSS.search(str(exc)))


def exit_text(rank: int, code: int) -> str:
    if code >= 0:
        return f"rank {rank} exited with code {code}"
    return f"rank {rank} died (killed by {signal.Signals(-code).name if -code in signal.valid_signals() else -code})"


def is_cause(notice: str) -> bool:
    """A rank that gave up on a peer exits with code 1, so a signal, another code or a hang is a cause."""
    return not notice.endswith("exited with code 1")


def cause_of(notices: list[str]) -> str:
    """The launcher's notices about ended ranks -> the account of the failure: its causes if known."""
    return "; ".join([n for n in notices if is_cause(n)] or notices)
