"""Validation of heat arrays from any source: one line naming the file and the bad cell (a ragged row,
a JSON true/false, NaN, inf, a negative or overflowing count), never a numpy traceback."""

from __future__ import annotations

from typing import Any

import numpy as np


class HeatError(ValueError):
    """A heat file or array that cannot be used; the message names the file and the field."""


def _ragged_where(obj: Any, names: tuple[str, ...]) -> str | None:
    """First list whose length differs from the first one at its depth -> 'layer 4 has 255 values...'."""
    want: list[int] = []
    probe = obj
    for _ in names:  # expected length per depth, read along first elements
        want.append(len(probe) if isinstance(probe, (list, tuple)) else -1)
        probe = probe[0] if isinstance(probe, (list, tuple)) and len(probe) else None

    def walk(node: Any, depth: int, path: str) -> str | None:
        for i, kid in enumerate(node):
            here = f"{path}{names[depth]} {i}"
            if not isinstance(kid, (list, tuple)):
                return f"{here} is not a list"
            if len(kid) != want[depth + 1]:
                unit = "values" if depth + 2 == len(names) else "entries"
                return f"{here} has {len(kid)} {unit}, expected {want[depth + 1]}"
            if depth + 2 < len(names):
                inner = walk(kid, depth + 1, f"{here}: ")
                if inner:
                    return inner
        return None

    return walk(obj, 0, "")


def _depth(obj: Any) -> int:
    """Nesting depth along first elements: [[1]] -> 2."""
    depth = 0
    while isinstance(obj, (list, tuple)) and len(obj):
        obj, depth = obj[0], depth + 1
    return depth


def _position(index: tuple[int, ...]) -> str:
    names = ("layer", "expert") if len(index) == 2 else ("step", "layer", "expert")
    return " ".join(f"{n} {i}" for n, i in zip(names, index, strict=True))


def _first_bool(obj: Any, names: tuple[str, ...], path: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    """Index of the first JSON true/false in nested lists (numpy would read it as 1/0), else None."""
    if not isinstance(obj, (list, tuple)) or not obj:
        return None
    if len(path) + 1 >= len(names) or not isinstance(obj[0], (list, tuple)):
        if bool in set(map(type, obj)):  # C-speed scan of a row; the index only on failure
            return (*path, next(i for i, v in enumerate(obj) if isinstance(v, bool)))
        return None
    for i, kid in enumerate(obj):
        found = _first_bool(kid, names, (*path, i))
        if found is not None:
            return found
    return None


def validate_heat(arr: Any, where: str) -> np.ndarray:
    """Array-like heat -> float64 [L, E] or [T, L, E]; HeatError naming `where` and the bad cell.

    Rejects ragged rows, non-numbers (JSON true/false included), empty arrays, wrong ndim, NaN, inf and
    negative counts. All-zero rows are valid (a layer that saw no tokens).
    """
    if isinstance(arr, (list, tuple)):
        found = _first_bool(arr, ("step", "layer", "expert"))
        if found is not None:
            cell = _position(found) if len(found) in (2, 3) else f"index {list(found)}"
            raise HeatError(f"{where}: true/false at {cell}; counts must be numbers")
    elif isinstance(arr, np.ndarray) and arr.dtype == np.bool_:
        raise HeatError(f"{where}: boolean array; counts must be numbers")
    try:
        out = np.array(arr, dtype=np.float64)
    except OverflowError:
        raise HeatError(f"{where}: a count too large to be a number of tokens") from None
    except (ValueError, TypeError) as exc:
        ragged = None
        if isinstance(arr, (list, tuple)) and _depth(arr) in (2, 3):
            names = ("layer", "expert") if _depth(arr) == 2 else ("step", "layer", "expert")
            ragged = _ragged_where(arr, names)
        raise HeatError(f"{where}: {ragged or f'values must be numbers ({exc})'}") from None
    if out.ndim not in (2, 3):
        raise HeatError(f"{where}: heat must be [layers, experts] or [steps, layers, experts], got shape "
                        f"{out.shape}")
    if out.size == 0:
        raise HeatError(f"{where}: heat is empty (shape {out.shape})")
    for bad, what in ((np.isnan(out), "NaN"), (np.isinf(out), "infinite value")):
        if bad.any():
            raise HeatError(f"{where}: {what} at {_position(tuple(int(i) for i in np.argwhere(bad)[0]))}")
    if (out < 0).any():
        first = tuple(int(i) for i in np.argwhere(out < 0)[0])
        raise HeatError(f"{where}: negative count {out[first]:g} at {_position(first)}")
    with np.errstate(over="ignore"):
        totals = out.sum(axis=-1)
    if not np.isfinite(totals).all():
        raise HeatError(f"{where}: counts too large: a layer's total is not a finite number")
    return out
