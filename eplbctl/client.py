"""Blocking ZeroMQ client of the eplbd control socket.

One DEALER socket, one request in flight. Every failure the CLI can meet becomes a `ClientError`
carrying the process exit code (sysexits), so the CLI has a single place to translate errors:

| error | exit code |
|---|---|
| `DaemonUnavailable` (no socket, no answer in time) | 69 EX_UNAVAILABLE |
| `DaemonError` 400 / 422 (the request's data is wrong) | 65 EX_DATAERR |
| `DaemonError` 401 (key mismatch) | 77 EX_NOPERM |
| `DaemonError` 404 / 426 (daemon and CLI disagree on the protocol) | 76 EX_PROTOCOL |
| `DaemonError` 409 / 503 (busy, not ready: try again later) | 75 EX_TEMPFAIL |
| `DaemonError` 500 and unknown codes | 70 EX_SOFTWARE |

This module must not import torch: `eplbctl status` has to answer in a fraction of a second.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import zmq

from eplbctl import PROTOCOL_VERSION
from eplbctl.endpoint import ipc_path, resolve_endpoint
from eplbctl.protocol import (
    ErrorCode,
    ProtocolError,
    deserialize,
    error_from_reply,
    make_request,
    new_session,
    serialize,
)

log = logging.getLogger(__name__)

EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77

_EXIT_CODES: dict[int, int] = {
    ErrorCode.BAD_REQUEST: EX_DATAERR,
    ErrorCode.INVALID_VALUE: EX_DATAERR,
    ErrorCode.BAD_SIGNATURE: EX_NOPERM,
    ErrorCode.UNKNOWN_TYPE: EX_PROTOCOL,
    ErrorCode.VERSION_MISMATCH: EX_PROTOCOL,
    ErrorCode.CONFLICT: EX_TEMPFAIL,
    ErrorCode.UNAVAILABLE: EX_TEMPFAIL,
    ErrorCode.INTERNAL: EX_SOFTWARE,
}


class ClientError(Exception):
    """Any failure talking to the daemon; `exit_code` is what the CLI process should exit with."""

    exit_code: int = EX_SOFTWARE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DaemonUnavailable(ClientError):
    """No daemon at the endpoint, or it did not answer in time."""

    exit_code = EX_UNAVAILABLE


class BadEndpoint(ClientError):
    """ZeroMQ cannot connect to the endpoint as written (a host it cannot parse): the command line's fault."""

    exit_code = 2


class DaemonError(ClientError):
    """The daemon answered with an error reply (`code` is an `ErrorCode` or a newer daemon's int)."""

    def __init__(self, code: int, message: str, content: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        try:
            self.code: ErrorCode | int = ErrorCode(code)
        except ValueError:
            self.code = code
        self.content = dict(content or {})
        self.exit_code = _EXIT_CODES.get(int(code), EX_SOFTWARE)


class Client:
    """Blocking request/reply client. Not thread-safe: use one per thread.

    >>> with Client(None, timeout_s=2) as c:        # doctest: +SKIP
    ...     c.request("status")["step"]
    """

    def __init__(self, endpoint: str | None = None, timeout_s: float = 5.0, key: bytes | None = None) -> None:
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            msg = f"timeout must be a positive finite number, got {timeout_s}"
            raise ValueError(msg)
        self.endpoint = resolve_endpoint(endpoint)
        if self.endpoint.startswith("tcp://"):
            if not key:
                msg = f"{self.endpoint}: a tcp:// endpoint needs a key (the daemon refuses tcp without one)"
                raise ValueError(msg)
            host = self.endpoint[len("tcp://"):].rpartition(":")[0]
            if self.endpoint.endswith(":*") or host == "*":
                msg = f"{self.endpoint}: cannot connect to a wildcard; give the daemon's host and port"
                raise ValueError(msg)
        self.timeout_s = float(timeout_s)
        self.key = key or None
        self.session = new_session()
        self._ctx: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and the context; safe to call more than once."""
        self._drop_socket()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._closed = True

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _get_socket(self) -> zmq.Socket:
        if self._closed:
            msg = "client is closed"
            raise RuntimeError(msg)
        if self._ctx is None:
            self._ctx = zmq.Context()
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                # An unclosed socket would make close()'s ctx.term() wait forever.
                sock.close(linger=0)
                raise BadEndpoint(f"cannot connect to {self.endpoint}: {exc.strerror}") from None
            self._socket = sock
        return self._socket

    # -- requests ----------------------------------------------------------------------------------

    def request(
        self, name: str, content: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> dict:
        """Send `<name>_request` and return the content of the matching reply (status "ok").

        Raises DaemonUnavailable when there is no daemon or no reply within the timeout, DaemonError
        for an error reply.
        """
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        path = ipc_path(self.endpoint)
        if path is not None and self._socket is None:
            self._probe_ipc(path)
        msg = make_request(name, content, self.session)
        sock = self._get_socket()
        try:
            sock.send_multipart(serialize(msg, self.key), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drop_socket()
            raise DaemonUnavailable(f"eplbd at {self.endpoint} is not accepting requests") from None
        reply = self._wait_reply(sock, msg.msg_id, timeout)
        error = error_from_reply(reply)
        if error is not None:
            code, message = error
            raise DaemonError(code, message, reply)
        return reply

    def _probe_ipc(self, path: str) -> None:
        """Fail at once when nobody can listen at `path`, instead of waiting for the timeout.

        A missing file means no daemon; a refused connection means the file of a daemon that died.
        zmq itself would keep retrying silently in both cases.
        """
        if not os.path.exists(path):
            raise DaemonUnavailable(f"no eplbd daemon at {self.endpoint} (is `eplbd sim` running?)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            raise DaemonUnavailable(
                f"no eplbd daemon at {self.endpoint} (is `eplbd sim` running?)"
            ) from None
        except PermissionError:
            raise DaemonUnavailable(f"cannot connect to {self.endpoint}: permission denied") from None
        except OSError:
            pass  # let zmq try, and report a timeout if it fails too
        finally:
            probe.close()

    def _wait_reply(self, sock: zmq.Socket, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                # A fresh socket next time: a late reply to this request must never be read as the
                # answer to the next one.
                self._drop_socket()
                raise DaemonUnavailable(f"eplbd at {self.endpoint} did not answer within {timeout:g}s")
            frames = sock.recv_multipart(zmq.NOBLOCK)
            try:
                reply = deserialize(frames, self.key)
            except ProtocolError as exc:
                self._reply_protocol_error(exc, msg_id)
                continue
            parent_id = reply.parent_header.get("msg_id")
            if parent_id != msg_id:
                log.debug("dropping stale reply %s to %s", reply.msg_type, parent_id)
                continue
            return reply.content

    def _reply_protocol_error(self, exc: ProtocolError, msg_id: str) -> None:
        if exc.code == ErrorCode.VERSION_MISMATCH:
            theirs = (exc.header or {}).get("version")
            self._drop_socket()
            raise DaemonError(
                exc.code,
                f"eplbd at {self.endpoint} speaks protocol version {theirs!r}, "
                f"this eplbctl speaks version {PROTOCOL_VERSION}: upgrade the older one",
            )
        if exc.code == ErrorCode.BAD_SIGNATURE:
            # With one request in flight on this socket, an unverifiable reply is almost surely the
            # daemon's 401 to us, signed with a key we do not have.
            self._drop_socket()
            raise DaemonError(
                exc.code,
                f"eplbd at {self.endpoint} signs with a different key (check --key-file)",
            )
        log.debug("dropping undecodable reply (%s) while waiting for %s", exc, msg_id)

    def hello(self, timeout_s: float | None = None) -> dict:
        """Ask the daemon who it is and check that it speaks our protocol version."""
        info = self.request("hello", timeout_s=timeout_s)
        version = info.get("version")
        if version != PROTOCOL_VERSION:
            raise DaemonError(
                ErrorCode.VERSION_MISMATCH,
                f"eplbd at {self.endpoint} speaks protocol version {version!r}, "
                f"this eplbctl speaks version {PROTOCOL_VERSION}: upgrade the older one",
                info,
            )
        return info
