"""Shared test helpers: a repo-local python, process-tree cleanup and a p2pd leak check."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

# Before anything imports torch: idle OpenMP threads sleep instead of spinning. On a loaded 2-core machine the
# default (active) policy lets a test's 2 OpenMP threads spin after every small op and starve everything else
# (benchmarks/expert_pool.py measured 402 ms vs 32 ms per step); child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def swarmtrain_cmd(*args: str) -> list[str]:
    """The ``swarmtrain`` command line run by this test interpreter."""
    return [sys.executable, "-m", "swarmtrain.peer", *args]


def spawn(args: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    """Start a role process in its own session (so the test can kill its whole process group)."""
    log = open(log_path, "wb")
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=full_env)


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Signal a group's leader (SIGKILL: the whole group), wait, then SIGKILL whatever is left of the group."""
    try:
        if sig == signal.SIGKILL:
            os.killpg(process.pid, sig)
        elif process.poll() is None:
            process.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.wait()


def group_alive(pgid: int) -> list[psutil.Process]:
    """Processes still alive in a process group (zombies excluded)."""
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return alive


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# Every process this test session starts (role processes, DHT processes, their p2pd) inherits this marker, so the
# leak check below finds exactly our own p2pd daemons and never touches those of other sessions on the machine.
SESSION_MARKER = "SWARMTRAIN_TEST_SESSION"
os.environ[SESSION_MARKER] = f"{os.getpid()}-{time.time_ns()}"


def _p2pd_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "p2pd":
            continue
        try:
            if proc.environ().get(SESSION_MARKER) == os.environ[SESSION_MARKER]:
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


@pytest.fixture(scope="session", autouse=True)
def no_leaked_p2pd():
    """Fail the session if its tests leave p2pd daemons behind (only this session's daemons are considered)."""
    before = _p2pd_pids()
    yield
    deadline = time.monotonic() + 15
    leaked = _p2pd_pids() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked = _p2pd_pids() - before
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leaked, f"tests left p2pd processes behind: {sorted(leaked)}"
