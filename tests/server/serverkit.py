"""What the control-server tests share: handlers with known behaviour and raw-socket helpers."""

from __future__ import annotations

import time

import zmq

from eplbctl.protocol import (
    RequestError,
    deserialize,
)

KEY = b"secret-key-for-tests"
SLOW_S = 1.5


def _status(content: dict) -> dict:
    return {"step": 42, "echo": content}


def _slow(content: dict) -> dict:
    time.sleep(SLOW_S)
    return {"which": "slow"}


def _boom(content: dict) -> dict:
    raise ZeroDivisionError("division by zero\nsecond line")


def _reject(content: dict) -> dict:
    raise RequestError(content["code"], "nope", {"hint": "try layers 0-57"})


HANDLERS = {"status": _status, "slow": _slow, "boom": _boom, "reject": _reject}


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _recv(sock: zmq.Socket, key: bytes | None = None):
    assert sock.poll(5000), "no reply within 5s"
    return deserialize(sock.recv_multipart(), key)
