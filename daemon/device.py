"""Device abstraction: Ascend NPU (torch_npu) when present, else CUDA, else CPU.

Everything device-specific the agent needs lives here: which device and collective backend to use,
side streams and events for transfers, and the memory figure. Probing torch_npu must not drag in
torch's device-backend autoload (it imports torch_npu eagerly and fails loudly where it is absent).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch


@dataclass(frozen=True)
class DeviceKind:
    name: str        # "npu" | "cuda" | "cpu"
    backend: str     # collective backend for the forward path: "hccl" | "nccl" | "gloo"

    def device(self, local_rank: int) -> torch.device:
        if self.name == "cpu":
            return torch.device("cpu")
        return torch.device(self.name, local_rank)


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:  # a broken CANN install must not break CPU users
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def detect(prefer: str = "auto") -> DeviceKind:
    """Pick the device kind: `prefer` is "auto", "npu", "cuda" or "cpu"."""
    if prefer not in ("auto", "npu", "cuda", "cpu"):
        raise ValueError(f"unknown device kind {prefer!r} (auto, npu, cuda, cpu)")
    if prefer in ("auto", "npu") and _npu_available():
        return DeviceKind("npu", "hccl")
    if prefer == "npu":
        raise ValueError("device npu requested but torch_npu is not usable here")
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        return DeviceKind("cuda", "nccl")
    if prefer == "cuda":
        raise ValueError("device cuda requested but CUDA is not available")
    return DeviceKind("cpu", "gloo")


class TransferStream:
    """A side stream for weight copies, with events so a buffer is never reused before it is read.

    On CPU every operation is already ordered on the calling thread, so the stream is a no-op and
    `record()` returns None; callers treat None as "already complete".
    """

    def __init__(self, kind: DeviceKind, device: torch.device) -> None:
        self.kind = kind
        self._module: Any = getattr(torch, kind.name, None) if kind.name != "cpu" else None
        self._stream = self._module.Stream(device=device) if self._module is not None else None

    def context(self) -> contextlib.AbstractContextManager:
        if self._stream is None:
            return contextlib.nullcontext()
        return self._module.stream(self._stream)

    def wait_current(self) -> None:
        """Make the side stream wait for work already queued on the current (forward) stream."""
        if self._stream is not None:
            self._stream.wait_stream(self._module.current_stream())

    def join_current(self) -> None:
        """Make the current stream wait for the side stream (before the forward reads new weights)."""
        if self._stream is not None:
            self._module.current_stream().wait_stream(self._stream)

    def record(self) -> Any:
        if self._stream is None:
            return None
        event = self._module.Event()
        event.record(self._stream)
        return event

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


def allocated_bytes(kind: DeviceKind, device: torch.device) -> int | None:
    """Device memory held by torch's allocator, where the backend reports it."""
    if kind.name == "cpu":
        return None
    module = getattr(torch, kind.name)
    return int(module.memory_allocated(device))
