"""Fixtures of the control-server tests: servers that always stop, a raw zmq context that always closes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import zmq
from eplbd.server import ControlServer
from serverkit import HANDLERS

from eplbctl.client import Client


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
