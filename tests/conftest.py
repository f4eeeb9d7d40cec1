"""Shared test fixtures.

SHARED_DATA is the real-data folder (../shared/data next to the repository); tests that need it
take the ``shared_data`` fixture, which skips cleanly when the folder is absent.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_daemon import FakeDaemon, serve

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real heat/route data folder; skips the test when it is not present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short path on purpose: an ipc socket path must stay under ~100 bytes (pytest's tmp_path may not).
    path = Path(tempfile.mkdtemp(prefix="ectl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon() -> FakeDaemon:
    """Protocol-shaped fake handlers behind a real ControlServer (see fake_daemon.py)."""
    return FakeDaemon()


@pytest.fixture
def endpoint(sockdir: Path, daemon: FakeDaemon) -> Iterator[str]:
    server = serve(f"ipc://{sockdir / 'control.sock'}", daemon)
    try:
        yield server.bound_endpoint
    finally:
        server.stop()


@pytest.fixture
def absent(sockdir: Path) -> str:
    """An endpoint nobody serves."""
    return f"ipc://{sockdir / 'nobody.sock'}"
