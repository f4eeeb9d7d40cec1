"""Placement (expert map) files <-> ``phy2log[L, N, S]``.

Formats:
  * ``ascend`` — vllm-ascend expert-map JSON::

        {"moe_layer_count": L,
         "layer_list": [{"layer_id": l, "device_count": N,
                         "device_list": [{"device_id": n, "device_expert": [e, ...]}, ...]}, ...]}

    Layers are ordered by ``layer_id`` and devices by ``device_id`` (which must be 0..N-1); every
    device must hold the same number of slots.  We write ``layer_id`` = MoE layer index 0..L-1.
  * ``sglang`` — ``{"physical_to_logical_map": [[e, ...] * P] * L}`` with P = N * S physical slots
    in device-major order; reading it needs N to reshape.

Every map read or written is checked with ``eplbctl.placement.validate_placement``; any problem is a
``MapFileError`` whose one-line message names the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from eplbctl.heat import nesting_guard
from eplbctl.placement import PlacementError, count_moves, validate_placement

FORMATS = ("ascend", "sglang")


class MapFileError(ValueError):
    """A placement file that cannot be read, written or served."""


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MapFileError(f"{where}: expected an integer, got {_short(value)}")
    if not -(2**63) <= value < 2**63:  # no id is that large; numpy would overflow on it
        raise MapFileError(f"{where}: {_short(value)} is out of range")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MapFileError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def ascend_to_placement(doc: Any, where: str) -> np.ndarray:
    """vllm-ascend expert-map document -> phy2log [L, N, S] int64 (not yet validated)."""
    if not isinstance(doc, dict) or "layer_list" not in doc:
        raise MapFileError(f"{where}: not a vllm-ascend expert map (no 'layer_list')")
    layers = _list(doc["layer_list"], f"{where}: layer_list")
    if not layers:
        raise MapFileError(f"{where}: layer_list is empty")
    declared = doc.get("moe_layer_count")
    if declared is not None and _int(declared, f"{where}: moe_layer_count") != len(layers):
        raise MapFileError(f"{where}: moe_layer_count says {declared} but layer_list has "
                           f"{len(layers)} layers")
    rows: dict[int, list[list[int]]] = {}  # layer_id -> devices -> experts
    shape: tuple[int, int] | None = None
    for pos, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise MapFileError(f"{where}: layer_list[{pos}] is not an object")
        layer_id = _int(layer.get("layer_id", pos), f"{where}: layer_list[{pos}].layer_id")
        if layer_id in rows:
            raise MapFileError(f"{where}: layer_id {layer_id} appears twice")
        devices = _list(layer.get("device_list"), f"{where}: layer {layer_id} device_list")
        count = layer.get("device_count")
        if count is not None and _int(count, f"{where}: layer {layer_id} device_count") != len(devices):
            raise MapFileError(f"{where}: layer {layer_id} device_count says {count} but device_list has "
                               f"{len(devices)} devices")
        by_id: dict[int, list[int]] = {}
        for dpos, dev in enumerate(devices):
            if not isinstance(dev, dict):
                raise MapFileError(f"{where}: layer {layer_id} device_list[{dpos}] is not an object")
            dev_id = _int(dev.get("device_id", dpos),
                          f"{where}: layer {layer_id} device_list[{dpos}].device_id")
            if dev_id in by_id:
                raise MapFileError(f"{where}: layer {layer_id} device {dev_id} appears twice")
            dwhere = f"{where}: layer {layer_id} device {dev_id} device_expert"
            by_id[dev_id] = [_int(e, dwhere) for e in _list(dev.get("device_expert"), dwhere)]
        if sorted(by_id) != list(range(len(by_id))):
            raise MapFileError(f"{where}: layer {layer_id} device ids {sorted(by_id)} are not "
                               f"0..{len(by_id) - 1}")
        shape = shape or (len(by_id), len(by_id[0]) if by_id else 0)  # (N, S) of the first layer
        if len(by_id) != shape[0]:
            raise MapFileError(f"{where}: layer {layer_id} has {len(by_id)} devices, expected {shape[0]}")
        for dev_id in sorted(by_id):
            if len(by_id[dev_id]) != shape[1]:
                raise MapFileError(f"{where}: layer {layer_id} device {dev_id} has {len(by_id[dev_id])} "
                                   f"experts, expected {shape[1]}")
        rows[layer_id] = [by_id[d] for d in sorted(by_id)]
    if sorted(rows) != list(range(len(rows))):  # MoE layer indices, like the device ids
        raise MapFileError(f"{where}: layer ids {_short(sorted(rows))} are not 0..{len(rows) - 1}")
    return np.array([rows[lid] for lid in sorted(rows)], dtype=np.int64)  # [L, N, S]


def placement_to_ascend(phy2log: np.ndarray) -> dict[str, Any]:
    """phy2log [L, N, S] -> vllm-ascend expert-map document (layer_id = MoE layer index)."""
    arr = np.asarray(phy2log)
    return {
        "moe_layer_count": int(arr.shape[0]),
        "layer_list": [
            {"layer_id": layer, "device_count": int(arr.shape[1]),
             "device_list": [{"device_id": dev, "device_expert": [int(e) for e in arr[layer, dev]]}
                             for dev in range(arr.shape[1])]}
            for layer in range(arr.shape[0])
        ],
    }


def sglang_to_placement(doc: Any, num_devices: int | None, where: str) -> np.ndarray:
    """SGLang ``physical_to_logical_map`` [L, P] -> phy2log [L, N, S] int64 (not yet validated)."""
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        raise MapFileError(f"{where}: not an SGLang map (no 'physical_to_logical_map')")
    if num_devices is None:
        raise MapFileError(f"{where}: an SGLang physical_to_logical_map needs the device count to reshape")
    if num_devices <= 0:
        raise MapFileError(f"{where}: device count must be positive, got {num_devices}")
    rows = _list(doc["physical_to_logical_map"], f"{where}: physical_to_logical_map")
    if not rows:
        raise MapFileError(f"{where}: physical_to_logical_map is empty")
    width = None
    for layer, row in enumerate(rows):
        lwhere = f"{where}: physical_to_logical_map layer {layer}"
        cells = [_int(e, lwhere) for e in _list(row, lwhere)]
        width = len(cells) if width is None else width
        if len(cells) != width:
            raise MapFileError(f"{lwhere} has {len(cells)} slots, expected {width} like layer 0")
    if not width or width % num_devices:
        raise MapFileError(f"{where}: {width} physical slots do not divide over {num_devices} devices")
    return np.array(rows, dtype=np.int64).reshape(len(rows), num_devices, -1)  # [L, N, S]


def placement_to_sglang(phy2log: np.ndarray) -> dict[str, Any]:
    """phy2log [L, N, S] -> ``{"physical_to_logical_map": [L][N*S]}`` (device-major)."""
    arr = np.asarray(phy2log)
    return {"physical_to_logical_map": arr.reshape(arr.shape[0], -1).astype(int).tolist()}


def _validated(phy2log: np.ndarray, num_experts: int | None, where: str) -> np.ndarray:
    arr = np.asarray(phy2log)
    if arr.ndim != 3 or arr.size == 0:
        raise MapFileError(f"{where}: placement must be a non-empty [layers, devices, slots], "
                           f"got {arr.shape}")
    experts = int(arr.max()) + 1 if num_experts is None else num_experts
    try:
        validate_placement(arr, experts)
    except PlacementError as exc:
        raise MapFileError(f"{where}: {exc}") from None
    return arr.astype(np.int64)


def read_map(path: str | Path, num_devices: int | None = None, num_experts: int | None = None
             ) -> np.ndarray:
    """Read an ascend or SGLang map (detected by its keys) -> validated phy2log [L, N, S] int64.

    num_experts defaults to the largest id + 1; num_devices is needed for SGLang maps and, when
    given, checked against ascend maps.
    """
    where = str(path)
    with nesting_guard(where, "an expert map", MapFileError):
        return _read_map(path, where, num_devices, num_experts)


def _read_map(path: str | Path, where: str, num_devices: int | None, num_experts: int | None) -> np.ndarray:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MapFileError(f"{where}: no such file") from None
    except json.JSONDecodeError as exc:
        raise MapFileError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MapFileError(f"{where}: cannot read ({exc.__class__.__name__})") from None
    if isinstance(doc, dict) and "layer_list" in doc:
        arr = ascend_to_placement(doc, where)
        if num_devices is not None and arr.shape[1] != num_devices:
            raise MapFileError(f"{where}: map has {arr.shape[1]} devices, expected {num_devices}")
    elif isinstance(doc, dict) and "physical_to_logical_map" in doc:
        arr = sglang_to_placement(doc, num_devices, where)
    else:
        raise MapFileError(f"{where}: unknown map format "
                           "(expected 'layer_list' or 'physical_to_logical_map')")
    return _validated(arr, num_experts, where)


def write_map(path: str | Path, phy2log: np.ndarray, fmt: str = "ascend", num_experts: int | None = None
              ) -> None:
    """Validate phy2log [L, N, S] and write it as `fmt` ("ascend" | "sglang"), replacing `path` atomically."""
    where = str(path)
    if fmt not in FORMATS:
        raise MapFileError(f"{where}: unknown map format '{fmt}' (choose from {', '.join(FORMATS)})")
    arr = _validated(phy2log, num_experts, where)
    doc = placement_to_ascend(arr) if fmt == "ascend" else placement_to_sglang(arr)
    _write_text(Path(path), json.dumps(doc) + "\n", where)


def _write_text(path: Path, text: str, where: str) -> None:
    """Atomic replace for a regular file (readers never see half a map), through a symlink to its target;
    a FIFO, a device or /dev/stdout is written in place: replacing it would destroy it."""
    if not where:
        raise MapFileError("no output path given")
    try:
        try:
            target = path.resolve(strict=False) if path.is_symlink() else path
        except RuntimeError:  # Python < 3.13 says a symlink loop this way
            raise MapFileError(f"{where}: cannot write (symbolic link loop)") from None
        if target.exists() and not target.is_file():
            if target.is_dir():
                raise MapFileError(f"{where}: is a directory")
            with open(target, "w", encoding="utf-8") as out:
                out.write(text)
            return
        mode = None
        if target.exists():
            if not os.access(target, os.W_OK):  # as a shell's `>` would: a read-only map stays as it is
                raise MapFileError(f"{where}: cannot write (Permission denied)")
            mode = stat.S_IMODE(target.stat().st_mode)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            if mode is not None:  # a private map stays private
                os.chmod(tmp, mode)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise MapFileError(f"{where}: cannot write ({exc.strerror or exc.__class__.__name__})") from None


def diff_maps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Moves from placement a to placement b: [L] int64 expert copies that must cross devices per layer."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise MapFileError(f"maps differ in shape: {a.shape} vs {b.shape} (layers, devices, slots)")
    return count_moves(a, b)
