"""Start a real `eplbd sim` for a test and always stop it (own process group, timeouts, finally)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from eplbctl.client import Client

SMALL = ["--ranks", "4", "--layers", "4", "--tokens", "32", "--tick", "4", "--window", "10",
         "--hidden", "32", "--ffn", "64", "--comm-timeout", "20"]


@dataclass
class SimDaemon:
    proc: subprocess.Popen
    endpoint: str
    log: Path

    def client(self, timeout_s: float = 60.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def running_sim(*args: str, ready_timeout: float = 180.0, env: dict | None = None) -> Iterator[SimDaemon]:
    tmp = tempfile.mkdtemp(prefix="eplbt-")
    endpoint = f"ipc://{tmp}/c.sock"
    log = Path(tmp) / "eplbd.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "eplbd.main", "sim", "--endpoint", endpoint, *args],
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                env={**os.environ, "EPLBD_PARENT_PID": str(os.getpid()), **(env or {})})
    daemon = SimDaemon(proc, endpoint, log)
    try:
        deadline = time.monotonic() + ready_timeout
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("eplbd: serving on") or not line:
                break
        if not line.startswith("eplbd: serving on"):
            raise RuntimeError(f"eplbd sim did not start:\n{daemon.log_text()[-3000:]}")
        yield daemon
    finally:
        stop(daemon)
        shutil.rmtree(tmp, ignore_errors=True)


def stop(daemon: SimDaemon) -> None:
    proc = daemon.proc
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            with daemon.client(timeout_s=5) as c:
                c.request("shutdown", {})
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


def wait_job(client: Client, job_id: int, timeout_s: float = 120.0, settled: bool = True) -> dict:
    """Poll a job until it ends (and, when `settled`, until its measured result is in)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.request("job", {"job_id": job_id})["job"]
        if job["state"] in ("failed", "nochange") or (job["state"] == "done" and
                                                      (not settled or job["measured_after"] is not None)):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s")
