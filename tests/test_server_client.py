"""The control server (daemon/server.py) and the blocking client (eplbctl/client.py) over real sockets."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from eplbd.server import ControlServer, ServerError

from eplbctl import PROTOCOL_VERSION
from eplbctl.client import Client, ClientError, DaemonError, DaemonUnavailable
from eplbctl.protocol import (
    DELIMITER,
    ErrorCode,
    RequestError,
    deserialize,
    make_request,
    new_header,
    pack,
    serialize,
)

pytestmark = pytest.mark.timeout(60)
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


@pytest.fixture
def endpoint(tmp_path) -> str:
    # A fresh sub-directory so that the server creates it (mode 0700) itself.
    return f"ipc://{tmp_path}/run/ctl.sock"


@pytest.fixture
def make_server() -> Iterator[Callable[..., ControlServer]]:
    """Start ControlServers; every one is stopped at teardown, even when the test fails."""
    servers: list[ControlServer] = []

    def start(endpoint: str, handlers: dict | None = None, **kwargs) -> ControlServer:
        server = ControlServer(endpoint, HANDLERS if handlers is None else handlers, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server, endpoint) -> ControlServer:
    return make_server(endpoint, info={"ranks": 4, "layers": 58})


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.bound_endpoint, timeout_s=5) as c:
        yield c


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A context for raw sockets; destroy() closes whatever a failing test left open."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _recv(sock: zmq.Socket, key: bytes | None = None):
    assert sock.poll(5000), "no reply within 5s"
    return deserialize(sock.recv_multipart(), key)


# -- replies ------------------------------------------------------------------------------------------


def test_status_request_gets_the_handler_content(client: Client) -> None:
    reply = client.request("status", {"layers": [1, 3]})
    assert reply == {"status": "ok", "step": 42, "echo": {"layers": [1, 3]}}


def test_hello_is_answered_by_the_server_with_info_and_version(client: Client) -> None:
    info = client.hello()
    assert info["version"] == PROTOCOL_VERSION
    assert info["ranks"] == 4 and info["layers"] == 58
    assert info["daemon"].startswith("eplbd ")


def test_hello_with_another_protocol_version_is_a_clear_error(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("eplbd.server.PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    with pytest.raises(DaemonError, match="speaks protocol version 2, this eplbctl speaks version 1") as info:
        client.hello()
    assert info.value.code == ErrorCode.VERSION_MISMATCH and info.value.exit_code == 76


@pytest.mark.parametrize(("code", "exit_code"), [(400, 65), (409, 75), (422, 65), (503, 75), (500, 70)])
def test_handler_request_error_becomes_an_error_reply_with_its_code(
    client: Client, code: int, exit_code: int
) -> None:
    with pytest.raises(DaemonError) as info:
        client.request("reject", {"code": code})
    assert info.value.code == code
    assert str(info.value) == "nope"
    assert info.value.exit_code == exit_code
    assert info.value.content["hint"] == "try layers 0-57"


def test_handler_exception_is_500_with_one_line_and_the_server_keeps_serving(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="eplbd.server"), pytest.raises(DaemonError) as info:
        client.request("boom")
    assert info.value.code == ErrorCode.INTERNAL and info.value.exit_code == 70
    assert str(info.value) == "internal error in boom: ZeroDivisionError: division by zero"
    assert any("boom" in r.getMessage() for r in caplog.records)
    assert client.request("status")["step"] == 42


def test_unknown_msg_type_gets_404(client: Client) -> None:
    with pytest.raises(DaemonError, match="unknown msg_type 'nosuch_request'") as info:
        client.request("nosuch")
    assert info.value.code == ErrorCode.UNKNOWN_TYPE
    assert "status_request" in info.value.content["known"]


def test_slow_handler_does_not_block_a_concurrent_status(server: ControlServer) -> None:
    results: dict[str, object] = {}

    def slow() -> None:
        with Client(server.bound_endpoint, timeout_s=10) as c:
            results["slow"] = c.request("slow")

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        time.sleep(0.2)  # the slow request is now running on a worker
        with Client(server.bound_endpoint, timeout_s=5) as c:
            t0 = time.monotonic()
            assert c.request("status")["step"] == 42
            elapsed = time.monotonic() - t0
    finally:
        thread.join(10)
    assert elapsed < 0.5
    assert results["slow"] == {"status": "ok", "which": "slow"}


# -- socket files -------------------------------------------------------------------------------------


def test_socket_file_is_0600_in_a_0700_directory(server: ControlServer, tmp_path) -> None:
    path = tmp_path / "run" / "ctl.sock"
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700


def test_stop_removes_the_socket_file_and_is_idempotent(make_server, endpoint, tmp_path) -> None:
    server = make_server(endpoint)
    server.stop()
    server.stop()
    assert not (tmp_path / "run" / "ctl.sock").exists()


def test_reply_of_a_request_running_when_stop_is_called_is_still_delivered(make_server, endpoint) -> None:
    flagged = threading.Event()

    def shutdown(content: dict) -> dict:
        flagged.set()  # like the daemon's shutdown handler: the owner stops the server on this signal
        time.sleep(0.2)
        return {"bye": True}

    server = make_server(endpoint, {"shutdown": shutdown})
    replies: list[dict] = []

    def ask() -> None:
        with Client(server.bound_endpoint, timeout_s=5) as c:
            replies.append(c.request("shutdown"))

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        assert flagged.wait(5)
        server.stop()
    finally:
        thread.join(10)
    assert replies == [{"status": "ok", "bye": True}]


def test_stale_socket_file_is_replaced(make_server, endpoint, tmp_path) -> None:
    path = tmp_path / "run" / "ctl.sock"
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a daemon that died: the file stays, nobody listens
    dead.close()
    assert path.exists()
    server = make_server(endpoint)
    with Client(server.bound_endpoint, timeout_s=5) as c:
        assert c.request("status")["step"] == 42


def test_live_daemon_at_the_endpoint_is_not_replaced(server: ControlServer, endpoint) -> None:
    second = ControlServer(endpoint, HANDLERS)
    with pytest.raises(ServerError, match="already serving"):
        second.start()
    with Client(server.bound_endpoint, timeout_s=5) as c:
        assert c.request("status")["step"] == 42


def test_regular_file_at_the_socket_path_is_left_alone(endpoint, tmp_path) -> None:
    path = tmp_path / "run" / "ctl.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("precious")
    with pytest.raises(ServerError, match="not a socket"):
        ControlServer(endpoint, HANDLERS).start()
    assert path.read_text() == "precious"


# -- client failures ----------------------------------------------------------------------------------


def test_client_without_daemon_fails_immediately(endpoint) -> None:
    with Client(endpoint, timeout_s=5) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable) as info:
            c.request("status")
    assert time.monotonic() - t0 < 0.2
    assert str(info.value) == f"no eplbd daemon at {endpoint} (is `eplbd sim` running?)"
    assert info.value.exit_code == 69 and isinstance(info.value, ClientError)


def test_client_against_a_dead_daemons_socket_file_fails_immediately(tmp_path) -> None:
    path = tmp_path / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with Client(f"ipc://{path}", timeout_s=5) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="no eplbd daemon at"):
            c.request("status")
    assert time.monotonic() - t0 < 0.2


def test_client_timeout_is_unavailable_and_a_late_reply_is_never_taken_for_the_next(
    server: ControlServer,
) -> None:
    with Client(server.bound_endpoint, timeout_s=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"did not answer within 0\.3s"):
            c.request("slow")
        assert time.monotonic() - t0 < 0.3 + 0.3
        time.sleep(SLOW_S)  # the slow reply is now sent to the abandoned socket
        assert c.request("status", timeout_s=5)["step"] == 42


def test_client_disconnecting_mid_command_does_not_wedge_the_server(
    server: ControlServer, zctx: zmq.Context
) -> None:
    for _ in range(2):  # one per worker
        sock = _dealer(zctx, server.bound_endpoint)
        sock.send_multipart(serialize(make_request("slow", {}, "gone")))
        time.sleep(0.05)
        sock.close(linger=0)
    time.sleep(SLOW_S + 0.3)  # both replies have now been sent to peers that are gone
    with Client(server.bound_endpoint, timeout_s=5) as c:
        assert c.request("status")["step"] == 42
        assert c.request("slow")["which"] == "slow"


def test_full_worker_queue_answers_503(make_server, endpoint, zctx: zmq.Context) -> None:
    server = make_server(endpoint, workers=1, max_pending=1)
    sock = _dealer(zctx, server.bound_endpoint)
    sock.send_multipart(serialize(make_request("slow", {}, "s")))
    time.sleep(0.1)
    with Client(server.bound_endpoint, timeout_s=5) as c, pytest.raises(DaemonError) as info:
        c.request("status")
    assert info.value.code == ErrorCode.UNAVAILABLE and info.value.exit_code == 75
    assert _recv(sock).content["which"] == "slow"


# -- malformed and unauthenticated peers --------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [b"garbage"],
        [DELIMITER, b"", b"\xc1", b"\x80", b"\x80"],
        [DELIMITER, b"", pack(new_header("status_request", "s")), pack({}), b"\xff\xff"],
    ],
)
def test_malformed_message_gets_400_and_the_server_keeps_serving(
    server: ControlServer, zctx: zmq.Context, frames: list[bytes]
) -> None:
    sock = _dealer(zctx, server.bound_endpoint)
    sock.send_multipart(frames)
    reply = _recv(sock)
    assert reply.content["status"] == "error" and reply.content["code"] == 400
    with Client(server.bound_endpoint, timeout_s=5) as c:
        assert c.request("status")["step"] == 42


def test_request_of_another_protocol_version_gets_426_with_the_daemon_version(
    server: ControlServer, zctx: zmq.Context
) -> None:
    msg = make_request("status", {}, "s")
    msg.header["version"] = PROTOCOL_VERSION + 1
    sock = _dealer(zctx, server.bound_endpoint)
    sock.send_multipart(serialize(msg))
    reply = _recv(sock)
    assert reply.parent_header["msg_id"] == msg.msg_id
    assert reply.content["code"] == 426 and reply.content["version"] == PROTOCOL_VERSION


def test_reply_from_a_newer_daemon_is_a_version_error(tmp_path, zctx: zmq.Context) -> None:
    endpoint = f"ipc://{tmp_path}/fake.sock"  # a hand-driven ROUTER playing a newer eplbd
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    errors: list[BaseException] = []

    def ask() -> None:
        with Client(endpoint, timeout_s=5) as c:
            try:
                c.request("status")
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        assert router.poll(5000)
        ident, *rest = router.recv_multipart()
        req = deserialize(rest)
        header = new_header("status_reply", "srv") | {"version": PROTOCOL_VERSION + 1}
        router.send_multipart([ident, DELIMITER, b"", pack(header), pack(req.header), pack({"status": "ok"})])
    finally:
        thread.join(10)
    assert isinstance(errors[0], DaemonError) and errors[0].code == 426
    assert "speaks protocol version 2" in str(errors[0])


def test_keyed_server_rejects_unsigned_and_wrongly_signed_requests_with_401(
    make_server, endpoint
) -> None:
    server = make_server(endpoint, key=KEY)
    with Client(server.bound_endpoint, timeout_s=5, key=KEY) as c:
        assert c.request("status")["step"] == 42
    with Client(server.bound_endpoint, timeout_s=5) as c, pytest.raises(DaemonError) as info:
        c.request("status")
    assert info.value.code == 401 and info.value.exit_code == 77
    with Client(server.bound_endpoint, timeout_s=5, key=b"wrong") as c, pytest.raises(DaemonError) as info:
        c.request("status")
    assert info.value.code == 401


def test_replayed_request_gets_409(make_server, endpoint, zctx: zmq.Context) -> None:
    server = make_server(endpoint, key=KEY)
    sock = _dealer(zctx, server.bound_endpoint)
    frames = serialize(make_request("status", {}, "s"), KEY)
    sock.send_multipart(frames)
    assert _recv(sock, KEY).content["status"] == "ok"
    sock.send_multipart(frames)
    assert _recv(sock, KEY).content["code"] == 409


# -- tcp ----------------------------------------------------------------------------------------------


def test_tcp_endpoint_without_a_key_is_refused() -> None:
    with pytest.raises(ServerError, match="without a key"):
        ControlServer("tcp://127.0.0.1:*", HANDLERS).start()


def test_tcp_endpoint_with_a_key_binds_a_real_port(make_server) -> None:
    server = make_server("tcp://127.0.0.1:*", key=KEY)
    assert server.bound_endpoint.startswith("tcp://127.0.0.1:")
    assert not server.bound_endpoint.endswith(":*")
    with Client(server.bound_endpoint, timeout_s=5, key=KEY) as c:
        assert c.hello()["version"] == PROTOCOL_VERSION


# -- import cost --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["eplbctl.client", "eplbd.server"])
def test_client_and_server_do_not_import_torch(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
