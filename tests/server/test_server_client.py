"""The control server (daemon/server.py) and the blocking client (eplbctl/client.py) over real sockets:
replies, socket files, client failures, import cost."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import zmq
from eplbd.server import ControlServer, ServerError
from serverkit import HANDLERS, SLOW_S, _dealer, _recv

from eplbctl import PROTOCOL_VERSION
from eplbctl.client import Client, ClientError, DaemonError, DaemonUnavailable
from eplbctl.protocol import (
    ErrorCode,
    make_request,
    serialize,
)

pytestmark = pytest.mark.timeout(60)


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


# -- import cost --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["eplbctl.client", "eplbd.server"])
def test_client_and_server_do_not_import_torch(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
