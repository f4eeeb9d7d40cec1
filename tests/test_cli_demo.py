"""``eplbctl demo`` driven against a protocol-shaped stand-in for ``eplbd sim`` (tests/fake_daemon.py).

The real end-to-end demo on the simulated deployment is exercised by the daemon's integration tests
(and by the README's quick start); here we check the CLI's orchestration: readiness, the steps in order,
failure reporting and that the daemon's process group is always gone afterwards.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import eplbctl.cli.demo as demo_mod
from eplbctl.cli import main

Sims = list[demo_mod.SimProcess]
FAKE = Path(__file__).resolve().parent / "fake_daemon.py"


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # The demo's private ipc socket lives in its temp dir: keep the path short.
    path = Path(tempfile.mkdtemp(prefix="ectl-"))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sims(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[demo_mod.SimProcess]]:
    started: list[demo_mod.SimProcess] = []

    class Recorded(demo_mod.SimProcess):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    monkeypatch.setattr(demo_mod, "SimProcess", Recorded)
    yield started
    for sim in started:  # belt and braces: never leave a process behind, whatever the test did
        sim.kill()


def use_fake(monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    def command(args: list[str], endpoint: str) -> list[str]:
        return [sys.executable, str(FAKE), *args, *extra, "--endpoint", endpoint]

    monkeypatch.setattr(demo_mod, "sim_command", command)


def run_demo(*args: str) -> Result:
    return CliRunner().invoke(main, ["demo", "--ranks", "2", *args], catch_exceptions=False)


def test_demo_passes(monkeypatch: pytest.MonkeyPatch, short_tmp: Path, sims: Sims) -> None:
    use_fake(monkeypatch)
    result = run_demo("--layers", "8")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for heading in ("== status ==", "== rebalance of the 4 worst layers: 2,4,5,7 ==",
                    "== status after the redeployment ==", "== profile ==",
                    "== verify: model output before and after =="):
        assert heading in out
    assert "job 1 done: 4 of 4 layers moved (steps 121-125)" in out
    assert "model output is bit-identical to the baseline" in out
    assert out.rstrip().endswith("demo passed: daemon shut down cleanly")
    assert len(sims) == 1 and sims[0].proc.returncode == 0
    assert list(short_tmp.iterdir()) == []  # logs removed without --keep-logs


def test_demo_keep_logs(monkeypatch: pytest.MonkeyPatch, short_tmp: Path, sims: Sims) -> None:
    use_fake(monkeypatch)
    result = run_demo("--keep-logs")
    assert result.exit_code == 0
    assert "eplbd: serving on ipc://" in sims[0].log_path.read_text()
    assert result.stderr.rstrip().endswith(f"logs kept in {sims[0].log_path.parent}")


def test_demo_fails_when_output_changes(monkeypatch: pytest.MonkeyPatch, short_tmp: Path,
                                       sims: Sims) -> None:
    use_fake(monkeypatch, "--bad-verify")
    result = run_demo()
    assert result.exit_code == 1
    assert "eplbctl: error: demo failed: model output changed after the redeployment" in result.stderr
    assert sims[0].proc.poll() is not None  # the daemon's group was killed
    assert f"logs kept in {sims[0].log_path.parent}" in result.stderr


def test_demo_daemon_dies_before_serving(monkeypatch: pytest.MonkeyPatch, short_tmp: Path,
                                         sims: Sims) -> None:
    monkeypatch.setattr(demo_mod, "sim_command",
                        lambda args, endpoint: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    result = run_demo()
    assert result.exit_code == 1
    expected = "eplbctl: error: demo failed: eplbd sim exited with code 3 before serving\n"
    assert result.stderr.endswith(expected)
    assert "boom" in result.stderr  # the log's tail is shown
