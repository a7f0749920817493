"""The network lab (scripts/netlab.py) does what tests and benchmarks rely on, with real namespaces and packets.

Checked here: the delay line adds the round trip asked for and the bridge adds none; the delay line carries well
over the rates the swarm is capped at; a tbf cap holds a TCP stream to its rate; a link taken down is a black hole
(silence, never a refusal or a reset) that link_up undoes; close() and cleanup_stale() leave nothing behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import netlab  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns]


@pytest.fixture(autouse=True)
def lab_requirements():
    missing = netlab.missing_requirements()
    if missing:
        pytest.fail(f"the network lab needs root and iproute2 (and gcc for the delay line); missing: "
                    f"{', '.join(missing)}")


def test_the_delay_line_adds_the_round_trip_time_asked_for():
    with netlab.Lab(2, rtt_ms=50) as lab:
        rtt = lab.ping_rtt_ms(0, 1, count=10)
    print(f"median RTT through the delay line, 50 ms asked: {rtt:.2f} ms")
    assert 45 <= rtt <= 65


def test_the_bridge_adds_no_delay():
    with netlab.Lab(2) as lab:
        rtt = lab.ping_rtt_ms(0, 1, count=10)
    print(f"median RTT through the bridge: {rtt:.3f} ms")
    assert rtt < 5


def test_the_delay_line_sustains_far_more_than_a_20_mbit_cap():
    with netlab.Lab(2, rtt_ms=50) as lab:
        mbps = lab.throughput_mbps(0, 1, seconds=3)
    print(f"one TCP stream through the 50 ms delay line: {mbps:.0f} Mbit/s")
    assert mbps >= 50


def test_a_20_mbit_cap_holds_a_tcp_stream_to_20_mbit_each_way():
    with netlab.Lab(2, rtt_ms=50) as lab:
        lab.cap(0, up_mbit=20, down_mbit=None)
        with netlab.UploadMeter(lab, 0, period_s=0.5) as meter:
            up = lab.throughput_mbps(0, 1, seconds=3)
        lab.cap(0, up_mbit=None, down_mbit=None)
        lab.cap(1, up_mbit=None, down_mbit=20)
        down = lab.throughput_mbps(0, 1, seconds=3)
    peak = meter.max_rate_mbps(window_s=1.0)
    print(f"capped at 20 Mbit/s: up {up:.1f}, down {down:.1f} Mbit/s; metered 1 s peak upload {peak:.1f} Mbit/s")
    assert 15 <= up <= 21
    assert 15 <= down <= 21
    assert 15 <= peak <= 21


_ECHO_SERVER = r"""
import socket, sys, threading
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
def echo(conn):
    while (data := conn.recv(65536)):
        conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""

_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(f"error {e.errno}")
"""

_CHATTER = r"""
import json, socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.settimeout(30)
print("connected", flush=True)
echoes, error, gaps, reader = 0, None, [], sock.makefile("rb")
try:
    for i in range(int(sys.argv[3])):
        t0 = time.monotonic()
        sock.sendall(b"%06d\n" % i)
        if reader.readline() != b"%06d\n" % i:
            break
        echoes += 1
        gaps.append(time.monotonic() - t0)
        time.sleep(0.1)
except OSError as e:
    error = repr(e)
print(json.dumps({"echoes": echoes, "error": error, "max_gap_s": max(gaps, default=0)}), flush=True)
"""


def _in_host(lab: netlab.Lab, i: int, script: str, *args: object, timeout: float = 30) -> str:
    argv = lab.host(i).cmd([sys.executable, "-c", script, *map(str, args)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout.strip()


@pytest.mark.parametrize("rtt_ms", [0, 50], ids=["bridge", "delayline"])
def test_link_down_is_a_black_hole_and_link_up_restores_it(rtt_ms, tmp_path):
    port = 7000
    with netlab.Lab(2, rtt_ms=rtt_ms) as lab:
        lab.spawn(1, [sys.executable, "-c", _ECHO_SERVER, lab.host(1).ip, str(port)], tmp_path / "echo.log")
        time.sleep(0.5)
        assert _in_host(lab, 0, _CONNECT, lab.host(1).ip, port, 5) == "connected"
        chatter = subprocess.Popen(lab.host(0).cmd([sys.executable, "-c", _CHATTER, lab.host(1).ip, str(port), "20"]),
                                   stdout=subprocess.PIPE, text=True)
        assert chatter.stdout.readline().strip() == "connected"
        time.sleep(0.5)
        lab.link_down(1)
        try:
            lost = lab.probe_rtts(0, 1, count=3, timeout_s=0.5)
            attempt = _in_host(lab, 0, _CONNECT, lab.host(1).ip, port, 2)
            address = subprocess.run(["ip", "-n", lab.host(1).ns, "-br", "addr", "show", "dev", lab.host(1).dev],
                                     capture_output=True, text=True, check=True).stdout
        finally:
            lab.link_up(1)
        stream = json.loads(chatter.communicate(timeout=60)[0])
        rtt_after = lab.ping_rtt_ms(0, 1, count=3)
    print(f"while down: pings {lost}, connect -> {attempt}, host 1 `{address.strip()}`; "
          f"established stream {stream}; after link_up ping {rtt_after:.2f} ms")
    assert lost == [None, None, None]
    assert attempt == "timeout"  # silence: neither a refusal nor an unreachable error
    assert lab.host(1).ip in address
    assert stream["error"] is None and stream["echoes"] == 20  # stalled, not reset
    assert stream["max_gap_s"] >= 1.5


def test_close_leaves_no_namespace_and_no_process(tmp_path):
    lab = netlab.Lab(3, rtt_ms=10)
    for i in range(3):
        lab.spawn(i, ["sh", "-c", "sleep 600 & sleep 600"], tmp_path / f"sleep{i}.log")
    time.sleep(0.3)
    pids = [int(pid) for ns in lab.namespaces()
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    assert len(pids) >= 7  # two sleeps and a shell per host, the delay line
    lab.close()
    lab.close()  # idempotent
    assert not set(lab.namespaces()) & set(netlab.list_namespaces())
    assert not [pid for pid in pids if _running(pid)]


def test_cleanup_stale_removes_the_labs_of_dead_processes():
    code = (f"import sys, time; sys.path.insert(0, {str(SCRIPTS)!r}); import netlab; "
            f"netlab.Lab(2, rtt_ms=10, tag='stale'); print('up', flush=True); time.sleep(600)")
    creator = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert creator.stdout.readline().strip() == "up"
    creator.send_signal(signal.SIGKILL)  # no atexit: its namespaces and delay line stay behind
    creator.wait()
    mine = [ns for ns in netlab.list_namespaces() if ns.startswith(f"netlab-{creator.pid}-stale-")]
    assert len(mine) == 3
    removed = netlab.cleanup_stale()
    assert set(mine) <= set(removed)
    assert not set(mine) & set(netlab.list_namespaces())


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed orphan waits for a reaper that may be slow)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
