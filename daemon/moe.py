"""The simulated MoE layers: real expert weights, a router driven by a real heat trace, dispatch,
local expert compute and combine across real torch.distributed ranks.

Why the output is bit-identical under any placement: expert weights and activations hold small
integers, so every product and sum is exact in the compute dtype (`compute_dtype` checks the bound
and widens to float64 when the chosen sizes could round). Replicas are generated from the same seed
as their expert, the combine adds the top-k outputs in a fixed order, and routing depends only on
(seed, step, rank, layer), never on the placement. So a wrong weight, a forgotten scale or a stale
map changes the output, and nothing else does.

Shapes: L layers, E experts, N ranks, S slots per rank, H hidden, F ffn, B tokens per rank, K top-k.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from eplbd.recorder import Recorder

_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class MoEShape:
    num_layers: int
    num_experts: int
    num_ranks: int
    slots: int
    hidden: int
    ffn: int
    top_k: int
    tokens: int   # tokens per rank per step

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's tensors (w1, w2, scale) as stored (float32)."""
        return 4 * (2 * self.hidden * self.ffn + self.hidden)


def mix_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def compute_dtype(shape: MoEShape) -> torch.dtype:
    """float32 while the largest possible combined output stays exact in 24 bits, else float64."""
    gate_sum = shape.top_k * (shape.top_k + 1) // 2
    bound = 4 * shape.hidden * shape.ffn * gate_sum
    return torch.float32 if bound < (1 << 24) else torch.float64


def make_expert(seed: int, layer: int, expert: int, hidden: int, ffn: int) -> list[torch.Tensor]:
    """The weights of one logical expert: [w1 [H, F], w2 [F, H], scale [H]], integer-valued float32."""
    gen = torch.Generator().manual_seed(mix_seed(seed, layer, expert))
    w1 = torch.randint(-1, 2, (hidden, ffn), generator=gen).to(torch.float32)
    w2 = torch.randint(-1, 2, (ffn, hidden), generator=gen).to(torch.float32)
    scale = torch.randint(1, 5, (hidden,), generator=gen).to(torch.float32)
    return [w1, w2, scale]


class ExpertStore:
    """Per-slot weights of every MoE layer on this rank: the tensors redeployment moves."""

    def __init__(self, shape: MoEShape, seed: int, device: torch.device) -> None:
        self.shape = shape
        self.seed = seed
        L, S, H, F = shape.num_layers, shape.slots, shape.hidden, shape.ffn
        self.w1 = torch.empty(L, S, H, F, dtype=torch.float32, device=device)
        self.w2 = torch.empty(L, S, F, H, dtype=torch.float32, device=device)
        self.scale = torch.empty(L, S, H, dtype=torch.float32, device=device)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every per-expert tensor, each [L, S, ...]: adding one here makes it move and be verified."""
        return [self.w1, self.w2, self.scale]

    def slot(self, layer: int, slot: int) -> list[torch.Tensor]:
        return [t[layer, slot] for t in self.tensors]

    def load(self, phy2log_rank: np.ndarray) -> None:
        """Fill every slot from the seed: phy2log_rank [L, S] for this rank."""
        for layer in range(phy2log_rank.shape[0]):
            for slot, expert in enumerate(phy2log_rank[layer].tolist()):
                parts = make_expert(self.seed, layer, expert, self.shape.hidden, self.shape.ffn)
                for dst, src in zip(self.slot(layer, slot), parts, strict=True):
                    dst.copy_(src)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Router:
    """Top-k routing sampled per token from a heat trace: heat [L, E] or [T, L, E] (row t % T)."""

    def __init__(self, heat: np.ndarray, top_k: int, seed: int) -> None:
        heat = np.asarray(heat, dtype=np.float64)
        series = heat[None] if heat.ndim == 2 else heat
        totals = series.sum(axis=2, keepdims=True)
        # an all-zero layer routes uniformly: tokens still flow, its heat just carries no signal
        probs = np.where(totals > 0, series / np.where(totals > 0, totals, 1.0), 1.0 / series.shape[2])
        self.log_probs = torch.from_numpy(np.log(probs + 1e-12)).to(torch.float32)  # [T, L, E]
        self.top_k = top_k
        self.seed = seed

    def route(self, step: int, rank: int, layer: int, tokens: int) -> torch.Tensor:
        """-> topk ids [B, K] int64 for this rank's tokens of this step and layer."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step, rank, layer, 1))
        logp = self.log_probs[step % self.log_probs.shape[0], layer]
        u = torch.rand(tokens, logp.shape[0], generator=gen).clamp_(1e-9, 1 - 1e-9)
        scores = logp - torch.log(-torch.log(u))  # Gumbel-top-k = sampling without replacement
        return torch.topk(scores, self.top_k, dim=1).indices


def layer_inputs(seed: int, step: int, rank: int, layer: int, tokens: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(mix_seed(seed, step, rank, layer, 2))
    return torch.randint(-1, 2, (tokens, hidden), generator=gen).to(torch.float32)


@dataclass
class Maps:
    """The routing maps a forward pass reads; updated in place at commit, never reallocated."""
    log2phy: torch.Tensor   # [L, E, MAXR] int64, padded with -1
    logcnt: torch.Tensor    # [L, E] int64


class SimMoE:
    """Forward of the MoE layers of one rank, with expert parallelism over `group`."""

    def __init__(self, shape: MoEShape, store: ExpertStore, router: Router, maps: Maps,
                 rank: int, group: dist.ProcessGroup | None = None) -> None:
        self.shape = shape
        self.store = store
        self.router = router
        self.maps = maps
        self.rank = rank
        self.group = group
        self.dtype = compute_dtype(shape)
        k = shape.top_k
        self.gates = torch.arange(k, 0, -1, dtype=self.dtype)  # [K]: k, k-1, ..., 1

    def _dispatch_targets(self, layer: int, topk: torch.Tensor) -> torch.Tensor:
        """topk [B, K] logical -> physical slot ids [B, K]; replicas split tokens round-robin."""
        B = topk.shape[0]
        counts = self.maps.logcnt[layer][topk]                        # [B, K]
        token_ids = (torch.arange(B) + self.rank * B)[:, None]        # global token index
        replica = token_ids % counts
        return self.maps.log2phy[layer][topk, replica]                # [B, K]

    def forward(self, step: int, recorder: Recorder, probe: bool = False) -> torch.Tensor:
        """Run every MoE layer for one step -> per-layer outputs [L, B, H] (compute dtype)."""
        shape = self.shape
        N, S, B, H = shape.num_ranks, shape.slots, shape.tokens, shape.hidden
        inputs, physical = [], []
        for layer in range(shape.num_layers):
            topk = self.router.route(step, self.rank, layer, B)
            inputs.append(layer_inputs(self.router.seed, step, self.rank, layer, B, H))
            physical.append(self._dispatch_targets(layer, topk).reshape(-1))     # [B*K]
        phys = torch.stack(physical)                                             # [L, B*K]
        dest = phys // S
        send_counts = torch.zeros(shape.num_layers, N, dtype=torch.int64)
        send_counts.scatter_add_(1, dest, torch.ones_like(dest))                 # [L, N]
        recv_counts = torch.empty_like(send_counts.t().contiguous())             # [N, L]
        dist.all_to_all_single(recv_counts, send_counts.t().contiguous(), group=self.group)
        send_split = send_counts.tolist()
        recv_split = recv_counts.t().tolist()                                    # [L][N]
        outputs = []
        for layer in range(shape.num_layers):
            outputs.append(self._layer(layer, inputs[layer], phys[layer], dest[layer],
                                       send_split[layer], recv_split[layer], recorder, probe))
        return torch.stack(outputs)

    def _layer(self, layer: int, x: torch.Tensor, phys: torch.Tensor, dest: torch.Tensor,
               send_split: list[int], recv_split: list[int], recorder: Recorder, probe: bool) -> torch.Tensor:
        shape = self.shape
        B, K, H, S = shape.tokens, shape.top_k, shape.hidden, shape.slots
        order = torch.argsort(dest, stable=True)                                 # [B*K] grouped by rank
        token_of_pair = order // K
        payload = torch.cat([x[token_of_pair], (phys[order] % S).to(torch.float32)[:, None]], dim=1)
        received = payload.new_empty(sum(recv_split), H + 1)
        dist.all_to_all_single(received, payload, recv_split, send_split, group=self.group)
        slots = received[:, H].to(torch.int64)
        if not probe:
            recorder.record(layer, slots)
        results = self._experts(layer, received[:, :H], slots)
        back = results.new_empty(B * K, H)
        dist.all_to_all_single(back, results, send_split, recv_split, group=self.group)
        per_pair = torch.empty_like(back)
        per_pair[order] = back                                                   # [B*K, H] pair order
        per_pair = per_pair.view(B, K, H)
        out = per_pair[:, 0] * self.gates[0]
        for j in range(1, K):  # fixed combine order: identical sums wherever the experts ran
            out = out + per_pair[:, j] * self.gates[j]
        return out

    def _experts(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """rows [n, H] routed to local `slots` [n] -> expert outputs [n, H]."""
        out = torch.zeros(rows.shape[0], self.shape.hidden, dtype=self.dtype)
        if rows.shape[0] == 0:
            return out
        order = torch.argsort(slots, stable=True)
        uniq, counts = torch.unique_consecutive(slots[order], return_counts=True)
        store, dtype = self.store, self.dtype
        start = 0
        for slot, count in zip(uniq.tolist(), counts.tolist(), strict=True):
            idx = order[start:start + count]
            start += count
            x = rows[idx].to(dtype)
            h = torch.relu(x @ store.w1[layer, slot].to(dtype))
            out[idx] = (h @ store.w2[layer, slot].to(dtype)) * store.scale[layer, slot].to(dtype)
        return out


def digest(outputs: torch.Tensor) -> str:
    """A bit-exact fingerprint of model outputs."""
    return hashlib.sha256(outputs.contiguous().numpy().tobytes()).hexdigest()
