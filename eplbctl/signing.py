"""HMAC authentication of control messages: the shared key file, frame signatures, and the cache
that refuses a replayed signature. Pure Python, no zmq or torch, shared by eplbctl and eplbd."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Iterable

REPLAY_CACHE_SIZE = 4096


def read_key(path: str | os.PathLike[str]) -> bytes:
    """The shared HMAC key in `path` (surrounding white space dropped); ValueError (one line) when the
    file cannot be read or holds no key. One reader for eplbctl and eplbd, so both take the same files."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise ValueError(f"key file {path}: {exc.strerror or exc}") from None
    if not key:
        raise ValueError(f"key file {path} is empty: it must hold the shared HMAC key")
    return key


def sign(key: bytes | None, frames: Iterable[bytes]) -> bytes:
    """Hex HMAC-SHA256 over the frames, each prefixed by its 8-byte big-endian length.

    The length prefix makes the signed input unambiguous: without it, moving bytes from the end of
    one frame to the start of the next would keep the signature valid.
    """
    if not key:
        return b""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        mac.update(len(frame).to_bytes(8, "big"))
        mac.update(frame)
    return mac.hexdigest().encode("ascii")


def signed_by(key: bytes, frames: Iterable[bytes], signature: bytes) -> bool:
    """Whether `signature` is the key's signature of the frames (compared in constant time)."""
    return hmac.compare_digest(signature, sign(key, frames))


class ReplayCache:
    """The signatures of the last `size` accepted messages (bounded: a daemon runs for weeks)."""

    def __init__(self, size: int = REPLAY_CACHE_SIZE) -> None:
        if size < 1:
            msg = f"replay cache size must be >= 1, got {size}"
            raise ValueError(msg)
        self.size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, signature: bytes) -> bool:
        return signature in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, signature: bytes) -> None:
        self._seen[signature] = None
        self._seen.move_to_end(signature)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
