"""Device abstraction: Ascend NPU (torch_npu) when present, else CUDA, else CPU.

Which device and collective backend an agent uses. Probing torch_npu must not drag in
torch's device-backend autoload (it imports torch_npu eagerly and fails loudly where it is absent).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

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
