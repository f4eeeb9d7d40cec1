"""Per-token route logs (vLLM route JSONL) -> heat: which experts each token picked, per layer.

A log holds an optional ``{"type": "meta", ...}`` line, then ``{"type": "route", "req_id", "token_idx",
"layer", "topk_ids", ...}`` lines. Warm-up / profiling passes (a pass is a run of rows of one request
with rising ``token_idx``, per layer) in which every token picks the same expert set are dropped, and
the notes say how many. ``load_heat`` reads such a file as a window sum; ``routes_to_episodes`` cuts
it into a time series of equal episodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eplbctl.heat import HeatData, _int_field, _json_lines, _read_text
from eplbctl.heatcheck import HeatError, validate_heat


def _is_warmup(rows: list[tuple[int, ...]]) -> bool:
    """A warm-up / profiling pass: at least two tokens, and every token picked the same expert set."""
    return len(rows) >= 2 and len({tuple(sorted(t)) for t in rows}) == 1


def _read_routes(records: list[tuple[int, dict[str, Any]]], name: str
                 ) -> tuple[list[int], int, list[np.ndarray], list[str]]:
    """Route rows -> (layer_ids, E, kept topk ids per layer [K_l, k], notes); warm-up passes dropped."""
    meta = next((rec for _, rec in records if rec.get("type") == "meta"), {})
    passes: dict[int, list[list[tuple[int, ...]]]] = {}  # layer -> passes -> topk rows
    last: dict[int, tuple[Any, int]] = {}  # layer -> (req_id, token_idx) of the previous row
    top_k = meta.get("top_k")
    for lineno, rec in records:
        if rec.get("type") != "route":
            continue
        where = f"{name} line {lineno}"
        layer = _int_field(rec, "layer", where)
        token = _int_field(rec, "token_idx", where)
        ids = rec.get("topk_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise HeatError(f"{where}: 'topk_ids' must be a non-empty list of expert ids, got {ids!r}")
        top_k = len(ids) if top_k is None else top_k
        if len(ids) != top_k:
            raise HeatError(f"{where}: {len(ids)} topk_ids, expected top_k={top_k}")
        prev = last.get(layer)
        if prev is None or prev[0] != rec.get("req_id") or token <= prev[1]:
            passes.setdefault(layer, []).append([])
        passes[layer][-1].append(tuple(ids))
        last[layer] = (rec.get("req_id"), token)
    if not passes:
        raise HeatError(f"{name}: no route records (lines with \"type\": \"route\")")
    notes: list[str] = []
    kept: list[np.ndarray] = []
    for layer in sorted(passes):
        warm = [p for p in passes[layer] if _is_warmup(p)]
        real = [p for p in passes[layer] if not _is_warmup(p)]
        if warm:
            sets = sorted({tuple(p[0]) for p in warm})
            notes.append(f"layer {layer}: dropped {sum(map(len, warm))} rows in {len(warm)} warm-up passes "
                         f"(every token picked the same experts, e.g. {list(sets[0])}); kept "
                         f"{sum(map(len, real))} rows in {len(real)} passes")
        if not real:
            raise HeatError(f"{name}: layer {layer} has only warm-up passes, no real traffic")
        kept.append(np.array([t for p in real for t in p], dtype=np.int64))  # [K_l, k]
    largest = max(int(k.max()) for k in kept)
    num_experts = meta.get("num_experts")
    if num_experts is None:
        num_experts = largest + 1
        notes.append(f"num_experts not in the meta record; inferred {num_experts} from the largest id")
    elif largest >= num_experts:
        raise HeatError(f"{name}: expert id {largest} out of range for num_experts={num_experts}")
    return sorted(passes), int(num_experts), kept, notes


def _bincount_rows(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids [T, M] -> counts [T, E] float64."""
    offsets = (np.arange(ids.shape[0], dtype=np.int64) * num_experts)[:, None]
    flat = np.bincount((ids + offsets).ravel(), minlength=ids.shape[0] * num_experts)
    return flat.reshape(ids.shape[0], num_experts).astype(np.float64)


def load_routes(records: list[tuple[int, dict[str, Any]]], name: str) -> HeatData:
    layer_ids, num_experts, kept, notes = _read_routes(records, name)
    heat = np.stack([_bincount_rows(k.reshape(1, -1), num_experts)[0] for k in kept])  # [L, E]
    return HeatData(heat=validate_heat(heat, name), layer_ids=layer_ids, source=name, notes=notes)


def routes_to_episodes(path: str | Path, tokens_per_episode: int) -> HeatData:
    """Route JSONL -> time series heat [T, L, E]: consecutive kept tokens cut into equal episodes.

    Warm-up passes are dropped first; a trailing partial episode is dropped (and noted), so every
    episode's row sums to tokens_per_episode x top_k.
    """
    if tokens_per_episode <= 0:
        raise HeatError(f"tokens per episode must be positive, got {tokens_per_episode}")
    path = Path(path)
    records = _json_lines(_read_text(path), str(path))
    layer_ids, num_experts, kept, notes = _read_routes(records, str(path))
    episodes = min(len(k) for k in kept) // tokens_per_episode
    if episodes == 0:
        raise HeatError(f"{path}: {min(len(k) for k in kept)} kept tokens make no episode of "
                        f"{tokens_per_episode}")
    per_layer = [_bincount_rows(k[: episodes * tokens_per_episode].reshape(episodes, -1), num_experts)
                 for k in kept]  # L x [T, E]
    left = min(len(k) for k in kept) - episodes * tokens_per_episode
    notes.append(f"{episodes} episodes of {tokens_per_episode} tokens; {left} trailing tokens dropped")
    heat = np.stack(per_layer, axis=1)  # [T, L, E]
    return HeatData(heat=validate_heat(heat, str(path)), layer_ids=layer_ids, source=str(path), notes=notes)
