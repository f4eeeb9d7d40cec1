"""Shared test fixtures.

SHARED_DATA is the real-data folder (../shared/data next to the repository); tests that need it
take the ``shared_data`` fixture, which skips cleanly when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real heat/route data folder; skips the test when it is not present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA
