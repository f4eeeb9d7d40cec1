"""The `eplbd sim` launcher on real processes: up-front checks, start-up races and failures, Ctrl-C
while starting, and naming the rank that hung as the cause of a failed job."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simdaemon import running_sim, wait_job

pytestmark = pytest.mark.timeout(300)

BASE = ["--layers", "4", "--tokens", "32", "--tick", "4", "--window", "10", "--hidden", "32", "--ffn", "64"]
EPLBD = [sys.executable, "-m", "eplbd.main", "sim"]


@contextlib.contextmanager
def eplbd(*args: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`eplbd sim ARGS` in its own session, output in files; its whole group is killed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="eplbt-"))
    if "--endpoint" not in args:  # never the operator's default socket
        args = (*args, "--endpoint", f"ipc://{tmp}/c.sock")
    with open(tmp / "out", "w") as out, open(tmp / "err", "w") as err:
        proc = subprocess.Popen([*EPLBD, *args], stdout=out, stderr=err, text=True, start_new_session=True,
                                env={**os.environ, "EPLBD_PARENT_PID": str(os.getpid()), **(env or {})})
    try:
        yield proc, tmp
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def finish(*args: str, timeout: float = 120, env: dict | None = None) -> tuple[int, str, str]:
    """Run `eplbd sim ARGS` to its end -> (exit code, stdout, stderr)."""
    with eplbd(*args, env=env) as (proc, tmp):
        code = proc.wait(timeout=timeout)
        return code, (tmp / "out").read_text(), (tmp / "err").read_text()


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eplbd: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def session_alive(sid: int) -> list[int]:
    """Processes of a session still running (zombies waiting for init to reap them do not count)."""
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    alive.append(int(pid))
    return alive


def no_process_left(sid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return session_alive(sid) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_empty_missing_or_unreadable_key_file_is_one_usage_line_before_any_rank_starts(tmp_path):
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for key_file, said in ((empty, "is empty"), (tmp_path / "missing.key", "No such file"),
                           (tmp_path, "Is a directory")):
        started = time.monotonic()
        code, out, err = finish("--ranks", "2", *BASE, "--endpoint", endpoint, "--key-file", str(key_file))
        assert code == 2 and said in one_error_line(err) and out == ""
        assert time.monotonic() - started < 30            # refused up front, no rank ever started


def test_fault_naming_a_rank_or_layer_the_deployment_lacks_is_one_usage_line():
    cases = [(["--ranks", "4", "--fault", "kill:rank=9:layer=0"], None, "rank 9 is not in 0-3"),
             (["--ranks", "2", "--fault", "hang:rank=1:layer=4"], None, "layer 4 is not in 0-3"),
             (["--ranks", "2"], {"EPLBD_FAULT": "corrupt:rank=-1:layer=0"}, "EPLBD_FAULT"),
             (["--ranks", "2", "--fault", "policy-raise:rank=1"], None, "takes only times"),
             (["--ranks", "2", "--fault", "hang:rank=1"], None, "needs rank=R and layer=L"),
             (["--ranks", "2", "--fault", "kill:rank=1:layer=0:layer=2"], None, "layer given twice")]
    for args, env, said in cases:
        code, out, err = finish(*args, *BASE, env=env)
        assert code == 2 and said in one_error_line(err) and out == "", (args, err)


def test_second_daemon_while_the_first_is_still_starting_is_one_line_and_exit_75(tmp_path):
    tmp = tmp_path
    endpoint = f"ipc://{tmp}/c.sock"
    with eplbd("--ranks", "4", *BASE, "--endpoint", endpoint) as (first, first_dir):
        deadline = time.monotonic() + 60
        while not (tmp / "c.sock.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, out, err = finish("--ranks", "2", *BASE, "--endpoint", endpoint, timeout=60)
        assert "serving on" not in (first_dir / "out").read_text(), "the first daemon was already up"
        assert code == 75 and "already serving" in one_error_line(err) and out == ""
        deadline = time.monotonic() + 180                 # the first one is untouched and comes up
        while "serving on" not in (first_dir / "out").read_text():
            assert first.poll() is None and time.monotonic() < deadline, (first_dir / "err").read_text()
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    assert not (tmp / "c.sock.lock").exists() and not (tmp / "c.sock").exists()


def test_endpoint_taken_when_rank_0_binds_is_one_line_exit_75_and_no_rank_is_left(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret\n")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ["--ranks", "2", *BASE, "--endpoint", endpoint, "--key-file", str(key)]
    with eplbd(*args) as (first, first_dir):
        deadline = time.monotonic() + 180
        while "serving on" not in (first_dir / "out").read_text():
            assert first.poll() is None and time.monotonic() < deadline, (first_dir / "err").read_text()
            time.sleep(0.2)
        with eplbd(*args) as (second, second_dir):
            code = second.wait(timeout=120)
            err = (second_dir / "err").read_text()
            assert code == 75 and "cannot bind" in one_error_line(err), err
            assert no_process_left(second.pid)


@pytest.mark.parametrize("delay", ["endpoint claimed", 0.6, 1.5])
def test_ctrl_c_while_starting_exits_130_quietly_and_leaves_no_rank(delay):
    with eplbd("--ranks", "2", *BASE) as (proc, tmp):
        if delay == "endpoint claimed":
            # The earliest moment that is ours: a fixed delay can land inside Python's own start-up
            # (importing site), where an interrupt is a fatal error of the interpreter, not of eplbd.
            deadline = time.monotonic() + 60
            while not (tmp / "c.sock.lock").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)                # as a terminal does: the whole foreground group
        code = proc.wait(timeout=60)
        err = (tmp / "err").read_text()
        if "serving on" in (tmp / "out").read_text():     # too slow to catch it starting: orderly shutdown
            assert code == 0
        else:
            assert code == 130, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        assert no_process_left(proc.pid)


def test_ctrl_c_after_the_server_listens_but_before_serving_is_quiet_and_leaves_no_socket():
    with eplbd("--ranks", "4", *BASE) as (proc, tmp):
        deadline = time.monotonic() + 120
        while "listening" not in (tmp / "err").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "err").read_text()
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        err = (tmp / "err").read_text()
        after = [line for line in err.split("listening", 1)[1].splitlines()[1:]
                 if " INFO " not in line]                            # what the interrupt printed
        if "serving on" in (tmp / "out").read_text():
            assert code == 0
        else:
            assert code == 130 and len(after) <= 1, err
        assert "Traceback" not in err
        assert no_process_left(proc.pid)
        assert not (tmp / "c.sock").exists() and not (tmp / "c.sock.lock").exists()


def test_hung_rank_is_named_as_the_cause_of_the_failed_job_as_soon_as_the_others_give_up():
    args = ["--ranks", "4", *BASE, "--comm-timeout", "6", "--fault", "hang:rank=3:layer=1"]
    with running_sim(*args) as sim, sim.client(timeout_s=30) as c:
        started = time.monotonic()
        job = c.request("rebalance", {"layers": [0, 1, 2], "dry_run": False})["job"]
        done = wait_job(c, job["job_id"], timeout_s=90, settled=False)
        assert done["state"] == "failed", done
        assert done["error"].startswith("rank 3 stopped answering (hung)"), done["error"]
        assert "exited with code 1" not in done["error"]  # the ranks that gave up are not blamed
        assert time.monotonic() - started < 6 + 12        # the time limit, the verdict, a few ticks
        st = c.request("status", {})
        assert st["transfer"] == "failed" and st["fault"].startswith("rank 3 stopped answering (hung)")


def test_hung_coordinator_is_named_on_one_line_and_the_daemon_exits_1():
    args = ["--ranks", "3", *BASE, "--redundant", "2", "--comm-timeout", "4", "--fault", "hang:rank=0:layer=1"]
    with running_sim(*args) as sim, sim.client(timeout_s=30) as c:
        c.request("rebalance", {"layers": [0, 1, 2], "dry_run": False})
        assert sim.proc.wait(timeout=60) == 1
        log = sim.log_text()
        assert "eplbd: error: rank 0 stopped answering (hung); the launcher killed it" in log
        assert "Traceback" not in log
        assert no_process_left(sim.proc.pid)


def test_a_caller_killed_by_sigkill_leaves_no_daemon_behind(tmp_path):
    """eplbctl demo and the tests own the daemon they start (EPLBD_PARENT_PID): when such a caller
    dies by a signal it cannot catch, the daemon and every rank go too, instead of living on."""
    caller = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         f"p = subprocess.Popen({[*EPLBD, '--ranks', '2', *BASE, '--endpoint', f'ipc://{tmp_path}/c.sock']!r},"
         " start_new_session=True, stdout=subprocess.PIPE, text=True,"
         " env={**os.environ, 'EPLBD_PARENT_PID': str(os.getpid())})\n"
         "print(p.pid, flush=True)\n"
         "print(p.stdout.readline(), flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    daemon = 0
    try:
        daemon = int(caller.stdout.readline())
        assert "serving on" in caller.stdout.readline()
        os.killpg(caller.pid, signal.SIGKILL)
        caller.wait(timeout=10)
        assert no_process_left(daemon, timeout_s=30), session_alive(daemon)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(caller.pid, signal.SIGKILL)
        if daemon:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon, signal.SIGKILL)
