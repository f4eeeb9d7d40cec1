"""The control server against malformed, unauthenticated, replaying or other-version peers, and on tcp."""

from __future__ import annotations

import threading

import pytest
import zmq
from eplbd.server import ControlServer, ServerError
from serverkit import HANDLERS, KEY, _dealer, _recv

from eplbctl import PROTOCOL_VERSION
from eplbctl.client import Client, DaemonError
from eplbctl.protocol import (
    DELIMITER,
    deserialize,
    make_request,
    new_header,
    pack,
    serialize,
)

pytestmark = pytest.mark.timeout(60)


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
