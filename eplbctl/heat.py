"""Heat: tokens routed per (layer, logical expert), and the file formats it comes in.

``load_heat(path)`` reads any supported file and returns ``HeatData`` whose ``heat`` is ``[L, E]``
(a window sum) or ``[T, L, E]`` (a time series), float64, validated (no NaN, inf or negatives).

Formats (chosen by extension, then by content):
  * SGLang JSON ``{"logical_count": [[...]*E]*L}`` (or ``[T][L][E]``) and SGLang ``.pt``
    (a dict holding a ``logical_count`` tensor, or a bare tensor; read with ``weights_only=True``).
  * Qwen / SGLang-stat JSON ``{"counts": [[...]], "num_layers": L, "num_experts": E}``.
  * Per-step JSONL -> ``[T, L, E]``; one JSON object per line, blank lines ignored, either
        {"step": 0, "layer": 3, "counts": [c0, c1, ...]}      one line per (step, layer), or
        {"step": 0, "counts": [[c0, ...], [c0, ...], ...]}   one line per step, every layer;
    one form per file; ``step`` ints, sorted on load (T = distinct steps); every step must have
    every layer, once.  ``layer`` is the model layer id; in the second form layers are 0..L-1.
  * Per-token route JSONL (vLLM route logs), read by ``routes.py`` (warm-up passes dropped).
  * Our compact ``.npz``: ``heat`` ([L, E] or [T, L, E]; integer counts stored as unsigned ints),
    ``layer_ids``, ``source`` and optional ``notes``; written by ``save_compact``.

Dense layers: in the raw formats, LEADING all-zero layers are dropped as dense when some other
layer is non-zero (DeepSeek-V3: model layers 0-2), and ``layer_ids`` keeps the model layer id of
each remaining MoE layer.  An all-zero layer after the first MoE layer is a valid MoE layer.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from eplbctl.heatcheck import HeatError, validate_heat
from eplbctl.layerspec import format_layers

DEFAULT_HEAT_NAME = "deepseek_v3_prefill_in1024.npz"


@dataclass
class HeatData:
    heat: np.ndarray  # [L, E] float64 window sum, or [T, L, E] time series
    layer_ids: list[int]  # model layer id per MoE layer
    source: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.heat.ndim not in (2, 3):
            raise HeatError(f"{self.source}: heat must be [L, E] or [T, L, E], got shape {self.heat.shape}")
        if len(self.layer_ids) != self.heat.shape[-2]:
            raise HeatError(
                f"{self.source}: {len(self.layer_ids)} layer ids for {self.heat.shape[-2]} layers"
            )

    @property
    def num_layers(self) -> int:
        return int(self.heat.shape[-2])

    @property
    def num_experts(self) -> int:
        return int(self.heat.shape[-1])

    @property
    def is_series(self) -> bool:
        return self.heat.ndim == 3

    def total(self) -> np.ndarray:
        """-> [L, E] float64: the heat summed over time (the heat itself when it is a window sum)."""
        return self.heat.sum(axis=0) if self.heat.ndim == 3 else self.heat


def _drop_dense(heat: np.ndarray, layer_ids: list[int], notes: list[str]) -> tuple[np.ndarray, list[int]]:
    """Drop leading all-zero layers (dense layers) when some later layer is non-zero."""
    per_layer = heat.sum(axis=-1) if heat.ndim == 2 else heat.sum(axis=(0, 2))  # [L]
    nonzero = np.flatnonzero(per_layer > 0)
    if len(nonzero) == 0 or nonzero[0] == 0:
        return heat, layer_ids
    k = int(nonzero[0])
    dense = format_layers(layer_ids[:k])
    notes.append(f"dropped {k} leading all-zero layers as dense (model layers {dense}); "
                 f"{len(layer_ids) - k} MoE layers remain")
    return heat[..., k:, :], layer_ids[k:]


# ----------------------------------------------------------------------------- formats


def _from_raw(arr: Any, where: str, source: str, notes: list[str], layer_ids: list[int] | None = None
              ) -> HeatData:
    heat = validate_heat(arr, where)
    ids = list(range(heat.shape[-2])) if layer_ids is None else layer_ids
    heat, ids = _drop_dense(heat, ids, notes)
    return HeatData(heat=heat, layer_ids=ids, source=source, notes=notes)


def _load_qwen(doc: dict[str, Any], name: str) -> HeatData:
    heat = validate_heat(doc["counts"], f"{name}: counts")
    for key, axis, what in (("num_layers", -2, "rows"), ("num_experts", -1, "columns")):
        declared = doc.get(key)
        if declared is not None and declared != heat.shape[axis]:
            raise HeatError(f"{name}: counts has {heat.shape[axis]} {what} but {key} says {declared}")
    notes = [f"recorded from {doc['src']}"] if isinstance(doc.get("src"), str) else []
    return _from_raw(heat, f"{name}: counts", name, notes)


def _load_pt(path: Path, name: str) -> HeatData:
    try:
        import torch  # lazy: the CLI must not pay for torch unless a .pt file is read
    except ImportError:
        raise HeatError(f"{name}: reading .pt heat files needs torch, which is not installed") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise HeatError(f"{name}: not a readable torch file ({exc.__class__.__name__})") from None
    if isinstance(obj, dict):
        if "logical_count" not in obj:
            raise HeatError(f"{name}: .pt dict has no 'logical_count' (keys: {sorted(map(str, obj))})")
        obj = obj["logical_count"]
    if not isinstance(obj, torch.Tensor):
        raise HeatError(f"{name}: expected a tensor, found {type(obj).__name__}")
    return _from_raw(obj.detach().cpu().double().numpy(), f"{name}: logical_count", name, [])


def _load_compact(path: Path, name: str) -> HeatData:
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy or pickle and talk of allow_pickle
        raise HeatError(f"{name}: not a valid .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("heat", "layer_ids", "source") if k not in npz.files]
            if missing:
                raise HeatError(f"{name}: compact heat file lacks {', '.join(missing)}")
            heat = validate_heat(npz["heat"], f"{name}: heat")
            layer_ids = [int(x) for x in npz["layer_ids"]]
            source = str(npz["source"])
            notes = [str(x) for x in npz["notes"]] if "notes" in npz.files else []
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        if isinstance(exc, HeatError):
            raise
        # Never echo numpy's advice to load pickles unsafely: an object array is simply not our format.
        reason = "it holds pickled objects" if "pickle" in str(exc) else str(exc)
        raise HeatError(f"{name}: not a valid .npz file ({reason})") from None
    if len(layer_ids) != heat.shape[-2]:
        raise HeatError(f"{name}: layer_ids has {len(layer_ids)} entries for {heat.shape[-2]} layers")
    return HeatData(heat=heat, layer_ids=layer_ids, source=source, notes=notes)


def save_compact(path: str | Path, data: HeatData) -> None:
    """Write `data` as our compact .npz (integer counts stored in the smallest unsigned type)."""
    heat = validate_heat(data.heat, f"{path}: heat")
    if np.all(heat == np.round(heat)):
        stored: np.ndarray = heat.astype(np.uint32 if heat.max() < 2**32 else np.uint64)
    else:
        stored = heat
    with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz"
        np.savez_compressed(fh, heat=stored, layer_ids=np.asarray(data.layer_ids, dtype=np.int64),
                            source=np.asarray(data.source), notes=np.asarray(data.notes, dtype=str))


def _loads(text: str, where: str, one_line: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = "" if one_line else f"line {exc.lineno}: "  # a JSONL line's number is in `where` already
        raise HeatError(f"{where}: not valid JSON ({at}{exc.msg})") from None
    except ValueError:  # Python refuses integers of more than 4300 digits (and says how to lift that)
        raise HeatError(f"{where}: a number with thousands of digits; counts must fit in 64 bits") from None


def _json_lines(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rec = _loads(line, f"{name} line {lineno}", one_line=True)
        if not isinstance(rec, dict):
            raise HeatError(f"{name} line {lineno}: expected a JSON object, found {type(rec).__name__}")
        out.append((lineno, rec))
    return out


def _int_field(rec: dict[str, Any], key: str, where: str) -> int:
    value = rec.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HeatError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def _load_steps(records: list[tuple[int, dict[str, Any]]], name: str) -> HeatData:
    per_layer = "layer" in records[0][1]
    cells: dict[int, dict[int, Any]] = {}  # step -> layer -> counts
    for lineno, rec in records:
        where = f"{name} line {lineno}"
        if ("layer" in rec) != per_layer or "counts" not in rec:
            form = "'step', 'layer', 'counts'" if per_layer else "'step', 'counts'"
            raise HeatError(f"{where}: expected keys {form} like line {records[0][0]}")
        step = _int_field(rec, "step", where)
        if per_layer:
            layer = _int_field(rec, "layer", where)
            if layer in cells.setdefault(step, {}):
                raise HeatError(f"{where}: step {step} layer {layer} appears twice")
            cells[step][layer] = rec["counts"]
        else:
            if step in cells:
                raise HeatError(f"{where}: step {step} appears twice")
            if not isinstance(rec["counts"], list):
                raise HeatError(f"{where}: 'counts' must be a list of per-layer lists")
            cells[step] = dict(enumerate(rec["counts"]))
    steps = sorted(cells)
    layers = sorted({layer for row in cells.values() for layer in row})
    for step in steps:
        lacking = [layer for layer in layers if layer not in cells[step]]
        if lacking:
            raise HeatError(f"{name}: step {step} lacks layer {lacking[0]}")
    nested = [[cells[s][layer] for layer in layers] for s in steps]
    notes = [f"{len(steps)} steps ({steps[0]}..{steps[-1]})"]
    return _from_raw(nested, f"{name}: counts", name, notes, layer_ids=layers)


# ----------------------------------------------------------------------------- entry points


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HeatError(f"{path}: cannot read as text ({exc.__class__.__name__})") from None


def _zip_kind(path: Path) -> str | None:
    """'npz' or 'pt' for a zip file (both numpy and torch save zips), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return "pt" if any(n.endswith("data.pkl") for n in names) else "npz"


@contextmanager
def nesting_guard(name: str, what: str, error: type[ValueError] = HeatError) -> Iterator[None]:
    """Turn the RecursionError of a pathologically nested JSON file ("[" * 3000) into `error`:
    "<name>: nested too deeply to be <what>" (bad data, one line). Shared with the map reader."""
    try:
        yield
    except RecursionError:
        raise error(f"{name}: nested too deeply to be {what}") from None


def load_heat(path: str | Path) -> HeatData:
    """Read heat in any supported format (see the module docstring); HeatError for anything else."""
    with nesting_guard(Path(path).name, "a heat file"):
        return _load_heat(path)


def _load_heat(path: str | Path) -> HeatData:
    """Read a heat file in any supported format (see the module docstring) -> HeatData."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise HeatError(f"{name}: no such file")
    if path.is_dir():
        raise HeatError(f"{name}: is a directory, not a heat file")
    suffix = path.suffix.lower()
    kind = {".npz": "npz", ".pt": "pt", ".pth": "pt"}.get(suffix) or _zip_kind(path)
    if kind == "npz":
        return _load_compact(path, name)
    if kind == "pt":
        return _load_pt(path, name)
    text = _read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        head = json.loads(first)
    except ValueError:  # not JSON, or a number with thousands of digits: decided below
        head = None
    if suffix == ".jsonl" or (isinstance(head, dict) and ("type" in head or "step" in head)):
        records = _json_lines(text, name)
        if not records:
            raise HeatError(f"{name}: empty file")
        if any(rec.get("type") in ("meta", "route") for _, rec in records[:2]):
            from eplbctl.routes import load_routes

            return load_routes(records, name)
        if "step" in records[0][1]:
            return _load_steps(records, name)
        raise HeatError(f"{name}: unknown JSONL records (expected 'step'/'counts' or 'type': 'route')")
    doc = _loads(text, name)
    if isinstance(doc, dict) and "logical_count" in doc:
        return _from_raw(doc["logical_count"], f"{name}: logical_count", name, [])
    if isinstance(doc, dict) and "counts" in doc:
        return _load_qwen(doc, name)
    if isinstance(doc, dict) and ("layer_list" in doc or "physical_to_logical_map" in doc):
        raise HeatError(f"{name}: this is a placement (expert map) file, not heat; use 'eplbctl map import'")
    keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
    raise HeatError(f"{name}: unknown heat format (expected 'logical_count' or 'counts', found {keys})")


def default_heat_path() -> Path:
    """The bundled demo heat (SGLang's published DeepSeek-V3 prefill_in1024 statistics) as a file path."""
    res = resources.files("eplbctl").joinpath("data", DEFAULT_HEAT_NAME)
    if isinstance(res, Path):
        return res
    # Installed inside a zip: copy the bytes out once to a stable temporary file.
    target = Path(tempfile.gettempdir()) / f"eplbctl-{DEFAULT_HEAT_NAME}"
    if not target.exists():
        target.write_bytes(res.read_bytes())
    return target
