"""Layer selections as operators type them: "3,7-9", "all".

Layers are MoE layer indices 0..L-1 (see docs/DESIGN.md).  ``parse_layers`` returns them sorted and
unique; ``format_layers`` writes the shortest spec back.  ``check_syntax`` reads a spec without knowing
L, so that a malformed one is rejected before anything asks the daemon for L.
"""

from __future__ import annotations


class LayerSpecError(ValueError):
    """A layer spec that cannot be read, with a one-line message naming the bad part."""


def _layer(text: str, item: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise LayerSpecError(f"bad layer '{item}' (expected a number, a range like 7-9, or 'all')")
    return int(text)


def check_syntax(spec: str) -> list[tuple[int, int]] | None:
    """ "3, 7-9" -> [(3, 3), (7, 9)]; "all" -> None. Raises LayerSpecError for a malformed spec."""
    text = "".join(spec.split())  # whitespace tolerant: " 7 - 9 " == "7-9"
    if not text:
        raise LayerSpecError("empty layer spec")
    if text.lower() == "all":
        return None
    ranges: list[tuple[int, int]] = []
    for item in text.split(","):
        if not item:
            raise LayerSpecError(f"empty item in layer spec '{spec.strip()}'")
        if "-" in item[1:]:
            first, _, last = item.partition("-")
            lo, hi = _layer(first, item), _layer(last, item)
            if lo > hi:
                raise LayerSpecError(f"bad range '{item}'")
        else:
            lo = hi = _layer(item, item)
        ranges.append((lo, hi))
    return ranges


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """ "3, 7-9" -> [3, 7, 8, 9]; "all" -> every layer; checked against 0..num_layers-1."""
    ranges = check_syntax(spec)
    if num_layers <= 0:
        raise LayerSpecError(f"no layers to choose from (num_layers={num_layers})")
    if ranges is None:
        return list(range(num_layers))
    chosen: set[int] = set()
    for lo, hi in ranges:
        if hi >= num_layers:
            raise LayerSpecError(f"layer {lo if lo >= num_layers else hi} out of range 0-{num_layers - 1}")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def format_layers(layers: list[int]) -> str:
    """[3, 7, 8, 9] -> "3,7-9" (sorted, unique; runs of two or more become ranges; [] -> "")."""
    ordered = sorted(set(layers))
    parts: list[str] = []
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            lo, hi = ordered[start], ordered[i - 1]
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
            start = i
    return ",".join(parts)
