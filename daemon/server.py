"""The control server: a ZeroMQ ROUTER socket on the coordinator rank (docs/protocol.md).

Threads:
- the *socket thread* owns the ROUTER socket (zmq sockets are not thread-safe). It parses and
  authenticates requests, answers `hello`, unknown types and protocol errors itself, and sends every
  reply;
- a small pool of *worker threads* runs the handlers, so that a slow one (a dry-run plan takes about
  a second) never delays a `status` reply. A worker hands its reply back through a queue and wakes
  the socket thread through a socketpair that the socket thread polls next to the ROUTER.

The server never touches device tensors: handlers read snapshots the agent publishes and queue
commands. It must keep serving whatever a peer sends or a handler does; replies to peers that have
gone away are dropped (ROUTER_MANDATORY stays off).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import zmq

from eplbctl import PROTOCOL_VERSION, __version__
from eplbctl.endpoint import ensure_endpoint_dir, ipc_path, resolve_endpoint
from eplbctl.protocol import (
    ErrorCode,
    Message,
    ProtocolError,
    RequestError,
    base_name,
    deserialize,
    make_error_reply,
    make_reply,
    new_session,
    serialize,
)
from eplbctl.signing import ReplayCache

log = logging.getLogger(__name__)

Handler = Callable[[dict], dict]
MAX_MESSAGE_BYTES = 16 << 20  # far above any real request; bounds what a peer can make us buffer
_RECV_BATCH = 64  # requests read per wake-up before the socket thread sends the replies it holds
_CLOSE_LINGER_MS = 200  # lets the last replies (shutdown's own) leave before the socket closes


class ServerError(RuntimeError):
    """The control server cannot start (endpoint in use, insecure endpoint, bad socket path)."""


class ControlServer:
    """Serve `handlers` (base name -> function of the request content) on `endpoint`.

    `info` is the content of the `hello` reply (besides `version`); it is read at every hello, so the
    owner may fill it in later (ranks, layers, ...). A handler returns the reply content (a dict, or
    None for `{}`), or raises `RequestError(code, message)` for an error reply.
    """

    def __init__(
        self,
        endpoint: str,
        handlers: Mapping[str, Handler],
        key: bytes | None = None,
        info: dict[str, Any] | None = None,
        workers: int = 2,
        max_pending: int = 64,
    ) -> None:
        if workers < 1 or max_pending < 1:
            msg = f"workers and max_pending must be >= 1, got {workers} and {max_pending}"
            raise ValueError(msg)
        self.endpoint = resolve_endpoint(endpoint)
        self.handlers = dict(handlers)
        self.key = key or None
        self.info = info if info is not None else {}
        self.workers = workers
        self.max_pending = max_pending
        self.session = new_session()
        self._replay = ReplayCache() if self.key else None
        self._bound: str | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._pool: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[tuple[Handler, Message] | None] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._pending = 0  # handled requests whose reply is not sent yet; socket thread only
        self._stopping = threading.Event()
        self._grace_s = 1.0
        self._ctx: zmq.Context | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._start_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def bound_endpoint(self) -> str:
        """The endpoint actually bound (a tcp port chosen by the system shows here)."""
        if self._bound is None:
            msg = "control server is not started"
            raise RuntimeError(msg)
        return self._bound

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Bind and start serving on a background thread; raise ServerError if that is not possible."""
        if self._thread is not None:
            msg = "control server already started"
            raise RuntimeError(msg)
        if self.endpoint.startswith("tcp://") and not self.key:
            msg = f"refusing to serve {self.endpoint} without a key: anyone who can reach it could redeploy"
            raise ServerError(msg)
        path = ensure_endpoint_dir(self.endpoint)
        if path is not None:
            take_over_socket(path, self.endpoint)
        self._ctx = zmq.Context()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping.clear()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="eplbd-control", daemon=True)
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self._thread.join()
            self._thread = None
            self._close_resources()
            msg = f"cannot bind {self.endpoint}: {error}"
            raise ServerError(msg) from error
        # Daemon threads: a handler that hangs must not keep the serving process from exiting.
        self._pool = [
            threading.Thread(target=self._work, name=f"eplbd-control-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for worker in self._pool:
            worker.start()
        log.info("control server listening on %s", self._bound)

    def stop(self, grace_s: float = 1.0, timeout_s: float = 5.0) -> None:
        """Stop serving, join the socket thread and remove the socket file. Idempotent.

        Requests already running get up to `grace_s` to finish and have their replies sent (the
        `shutdown` reply above all: its handler only flags the shutdown, the owner then calls stop);
        new requests meanwhile get 503.
        """
        if self._thread is None:
            return
        self._grace_s = grace_s
        self._stopping.set()
        self._wake()
        self._thread.join(grace_s + timeout_s)
        if self._thread.is_alive():
            log.warning("control server thread did not stop within %.1fs", grace_s + timeout_s)
        for _ in self._pool:
            self._jobs.put(None)
        for worker in self._pool:
            # A handler still running is abandoned (daemon thread); its reply goes nowhere. A handler
            # may itself call stop(): a thread cannot join itself.
            if worker is not threading.current_thread():
                worker.join(0.1)
        self._pool = []
        stuck = self._thread.is_alive()
        self._thread = None
        self._remove_own_socket_file()
        self._close_resources(term=not stuck)
        self._bound = None
        log.info("control server stopped")

    def _close_resources(self, term: bool = True) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._ctx is not None and term:
            self._ctx.term()
        self._ctx = None

    def _remove_own_socket_file(self) -> None:
        path = ipc_path(self.endpoint)
        if path is None or self._socket_inode is None:
            return
        try:
            st = os.lstat(path)
            # Only our own file: a newer daemon may have taken the name over after a stale check.
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._socket_inode = None

    # -- socket thread -----------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        assert self._ctx is not None
        router = self._ctx.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # unroutable replies are dropped, never block
            router.bind(self.endpoint)
            self._bound = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            path = ipc_path(self._bound)
            if path is not None:
                os.chmod(path, 0o600)
                st = os.lstat(path)
                self._socket_inode = (st.st_dev, st.st_ino)
        except Exception as exc:
            self._start_error = exc
            router.close(linger=0)
            ready.set()
            return
        ready.set()
        try:
            self._serve(router)
        except Exception:
            log.exception("control server socket thread failed")
        finally:
            router.close(linger=_CLOSE_LINGER_MS)

    def _serve(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        deadline: float | None = None
        while True:
            timeout_ms = None
            if self._stopping.is_set():
                deadline = deadline if deadline is not None else time.monotonic() + self._grace_s
                remaining = deadline - time.monotonic()
                if self._pending <= 0 or remaining <= 0:
                    break
                timeout_ms = remaining * 1000
            events = dict(poller.poll(timeout_ms))
            if router in events:
                for _ in range(_RECV_BATCH):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._on_request(router, frames)
                    except Exception:  # whatever went wrong with one message, keep serving
                        log.exception("failed to handle a control message")
            if self._wake_r in events:
                self._drain_wake()
            self._send_pending_replies(router)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the buffer is full (a wake-up is already pending) or we are shutting down

    def _send(self, router: zmq.Socket, frames: list[bytes]) -> None:
        try:
            router.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # The peer went away or stopped reading: its reply is dropped, others are unaffected.
            log.debug("dropping undeliverable reply: %s", exc)

    def _send_pending_replies(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = self._replies.get_nowait()
            except queue.Empty:
                return
            self._pending -= 1
            self._send(router, frames)

    def _error(self, router: zmq.Socket, header: dict | None, identities: list[bytes], code: int,
               message: str, details: Mapping[str, Any] | None = None) -> None:
        reply = make_error_reply(header, code, message, self.session, identities, details)
        self._send(router, serialize(reply, self.key))

    def _on_request(self, router: zmq.Socket, frames: list[bytes]) -> None:
        try:
            msg = deserialize(frames, self.key, self._replay)
        except ProtocolError as exc:
            log.warning("rejected control message: %s", exc)
            # A ROUTER always prepends the peer's routing id, so even a message without a delimiter
            # can be answered.
            identities = exc.identities or frames[:1]
            self._error(router, exc.header, identities, exc.code, exc.message, exc.details)
            return
        name = base_name(msg.msg_type)
        if name == "hello":
            self._send(router, self._call(self._hello, msg))
            return
        handler = self.handlers.get(name) if name is not None else None
        if handler is None:
            self._error(router, msg.header, msg.identities, ErrorCode.UNKNOWN_TYPE,
                        f"unknown msg_type {msg.msg_type!r}",
                        {"known": sorted(f"{n}_request" for n in {"hello", *self.handlers})})
            return
        if self._stopping.is_set():
            self._error(router, msg.header, msg.identities, ErrorCode.UNAVAILABLE, "daemon is shutting down")
            return
        if self._pending >= self.max_pending:
            self._error(router, msg.header, msg.identities, ErrorCode.UNAVAILABLE,
                        f"daemon busy: {self._pending} requests in progress, try again")
            return
        self._pending += 1
        self._jobs.put((handler, msg))

    def _hello(self, content: dict) -> dict:
        # Read at every hello: the owner fills `info` in once the deployment knows its sizes.
        return {"daemon": f"eplbd {__version__}", **self.info, "version": PROTOCOL_VERSION}

    # -- worker threads ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            handler, msg = job
            self._replies.put(self._call(handler, msg))
            self._wake()

    def _call(self, handler: Handler, msg: Message) -> list[bytes]:
        """Run one handler and return the serialized reply; never raises."""
        name = base_name(msg.msg_type)
        try:
            try:
                result = handler(dict(msg.content))
                if result is None:
                    result = {}
                if not isinstance(result, Mapping):
                    msg_text = f"handler {name!r} returned {type(result).__name__}, not a dict"
                    raise TypeError(msg_text)
                return serialize(make_reply(msg, result, self.session), self.key)
            except RequestError as exc:
                reply = make_error_reply(msg.header, exc.code, exc.message, self.session, msg.identities,
                                         exc.details)
                return serialize(reply, self.key)
        except Exception as exc:
            log.exception("handler %r failed", name)
            first_line = (str(exc).splitlines() or [""])[0][:300]
            text = f"internal error in {name}: {type(exc).__name__}"
            if first_line:
                text += f": {first_line}"
            reply = make_error_reply(msg.header, ErrorCode.INTERNAL, text, self.session, msg.identities)
            return serialize(reply, self.key)


def take_over_socket(path: str, endpoint: str) -> None:
    """Remove a stale control socket left by a dead daemon; ServerError if a live daemon serves it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        msg = f"{path} exists and is not a socket: refusing to replace it"
        raise ServerError(msg)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: a daemon died without cleaning up. Safe to take the name over.
        log.info("removing stale control socket %s", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as exc:
        msg = f"cannot check whether a daemon listens on {path}: {exc}"
        raise ServerError(msg) from exc
    finally:
        probe.close()
    msg = f"an eplbd daemon is already serving at {endpoint} (stop it or use another --endpoint)"
    raise ServerError(msg)
