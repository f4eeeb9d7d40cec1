"""The staging buffer of the transfer engine and the checksums that verify what it received.

Staging is one byte buffer `[capacity, row_bytes]`: a row holds every per-expert tensor of one expert
(each at an aligned offset) followed by their checksums, so the experts one sender ships to one peer
in a batch travel as a single message, whatever the number of per-expert tensors.
"""

from __future__ import annotations

import torch

_POSITION_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _words(rows: torch.Tensor) -> torch.Tensor:
    """[n, ...] any dtype -> [n, W] int32: each row's bytes as 32-bit words (byte by byte when 4 does not divide)."""
    n = rows.shape[0]
    raw = rows.contiguous().view(torch.uint8).reshape(n, -1)
    if raw.shape[1] % 4 == 0:
        return raw.view(torch.int32)
    return raw.to(torch.int32)


def batch_checksums(batch: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n] int64: exact, order-sensitive fingerprint of each row's bits.

    Words times position weights in wrapping int32 (deterministic on every device), summed in int64:
    a third of the cost of widening every word first, which matters because verify sits on the stall.
    """
    words = _words(batch)
    key = (words.shape[1], str(words.device))
    weights = _POSITION_WEIGHTS.get(key)
    if weights is None:
        weights = (torch.arange(words.shape[1], device=words.device) % 251 + 1).to(words.dtype)
        _POSITION_WEIGHTS[key] = weights
    return (words * weights).sum(dim=1, dtype=torch.int64)


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """One tensor's fingerprint (int64 scalar on its device); equal to its row in batch_checksums."""
    return batch_checksums(tensor.unsqueeze(0))[0]


def slot_checksums(tensors: list[torch.Tensor], layer: int, slot: int) -> torch.Tensor:
    """-> [T] int64: one checksum per per-expert tensor of a slot."""
    return torch.stack([checksum(t[layer, slot]) for t in tensors])


def _align(n: int, to: int = 16) -> int:
    return -(-n // to) * to


class Staging:
    """The reusable staging buffer: `capacity` rows, each one expert's tensors and their checksums.

    views[k] is a [capacity, ...] view of tensor k's part of every row; sums is [capacity, T] int64.
    """

    def __init__(self, tensors: list[torch.Tensor], capacity: int) -> None:
        offsets, at = [], 0
        for t in tensors:
            offsets.append(at)
            at = _align(at + t[0, 0].numel() * t.element_size())
        self.sums_offset = at
        self.row_bytes = _align(at + 8 * len(tensors))
        self.capacity = capacity
        self.flat = torch.zeros(capacity, self.row_bytes, dtype=torch.uint8, device=tensors[0].device)
        self.views = []
        for t, off in zip(tensors, offsets, strict=True):
            nbytes = t[0, 0].numel() * t.element_size()
            part = self.flat[:, off:off + nbytes].view(t.dtype)
            self.views.append(part.view(capacity, *t.shape[2:]))
        self.sums = self.flat[:, at:at + 8 * len(tensors)].view(torch.int64)

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def fill(self, rows: slice, tensors: list[torch.Tensor], layer: int, slots: torch.Tensor,
             sums: torch.Tensor) -> None:
        """Copy live slots `slots` of `layer` (and their checksums [n, T]) into staging `rows`."""
        for view, t in zip(self.views, tensors, strict=True):
            torch.index_select(t[layer], 0, slots, out=view[rows])   # straight into the strided rows
        self.sums[rows].copy_(sums)
