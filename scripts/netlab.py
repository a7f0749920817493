"""A network lab on one machine: N hosts, each in its own network namespace, joined by one switch.

What it is for: tests and benchmarks that need real sockets between separate hosts with a given round-trip time,
bandwidth caps and links that vanish. Each host has one veth (``eth0``, address ``{subnet}.{i+1}/24``) whose peer
sits in a "switch" namespace. Without ``rtt_ms`` the switch is a Linux bridge (kernel fast path); with ``rtt_ms`` it
is ``delayline`` (``scripts/delayline.c``, compiled with gcc on first use), a userspace learning switch that holds
each frame for ``rtt_ms / 2`` so that every round trip between two hosts costs ``rtt_ms`` more. Caps are tc tbf
qdiscs on the veths; a link taken down is a black hole (the host keeps its address, packets vanish, no RST).
What it is not for: loss, jitter or per-pair latency (this kernel has no netem), or anything outside one machine.
It needs root, iproute2 and (for ``rtt_ms``) gcc; ``missing_requirements()`` says what is absent. Stdlib only.

    with Lab(2, rtt_ms=50) as lab:
        lab.cap(0, up_mbit=20, down_mbit=None)
        server = lab.spawn(1, ["python3", "-m", "http.server", "--bind", lab.host(1).ip], "/tmp/server.log")
        print(lab.ping_rtt_ms(0, 1), lab.throughput_mbps(0, 1, seconds=3))

``python scripts/netlab.py selftest`` prints what this machine measures; ``... cleanup`` removes dead labs; the
lab runs the same file inside the namespaces for its probes (``ping``, ``tcp-receive``, ``tcp-send``).
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NS_PREFIX = "netlab"
HOST_DEV = "eth0"
_NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-([A-Za-z0-9]+)-(sw|h\d+)$")
_TAGS = itertools.count()


class LabError(RuntimeError):
    """A lab command failed, or the lab could not be built or torn down completely."""


class Unreachable(LabError):
    """No probe got an answer: the destination is cut off (``link_down``) or absent."""


@dataclass(frozen=True)
class Host:
    """One lab host: its namespace, its address and the two ends of its link."""

    index: int
    ns: str
    ip: str
    dev: str  # the veth inside the host's namespace
    switch_dev: str  # its peer, inside the switch namespace

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]


class Lab:
    """N hosts on one switch, torn down by ``close()`` (idempotent; also run at exit).

    Contract: after ``Lab(...)`` returns, every host reaches every other one through the switch with ``rtt_ms``
    added to each round trip; after ``close()`` no namespace of the lab and no process inside one is left, or
    ``close()`` raises ``LabError`` saying what remains.
    """

    def __init__(self, hosts: int, rtt_ms: float = 0.0, subnet: str = "10.213.90", tag: str | None = None):
        if not 1 <= hosts <= 64:
            raise ValueError(f"hosts must be within 1..64, not {hosts}")
        tag = tag if tag is not None else str(next(_TAGS))
        if not re.fullmatch(r"[A-Za-z0-9]+", tag):
            raise ValueError(f"tag must be alphanumeric: {tag!r}")
        self.rtt_ms = float(rtt_ms)
        prefix = f"{NS_PREFIX}-{os.getpid()}-{tag}"
        self.switch_ns = f"{prefix}-sw"
        self.hosts = [Host(i, f"{prefix}-h{i}", f"{subnet}.{i + 1}", HOST_DEV, f"h{i}") for i in range(hosts)]
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.delayline_report = ""  # the delay line's statistics line, once closed
        self._procs: list[subprocess.Popen] = []
        self._delayline: subprocess.Popen | None = None
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def host(self, i: int) -> Host:
        return self.hosts[i]

    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(h.ns for h in self.hosts)]

    def spawn(self, i: int, argv: list[str], log_path: str | os.PathLike, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` inside host ``i`` in its own session, stdout and stderr to ``log_path``."""
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(self.host(i).cmd(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=dict(os.environ, **(env or {})))
        self._procs.append(proc)
        return proc

    def cap(self, i: int, up_mbit: float | None, down_mbit: float | None, burst: str = "64kb",
            latency: str = "400ms") -> None:
        """Cap host ``i``'s upload (its egress) and download (the switch port's egress); None lifts that cap."""
        host = self.host(i)
        _set_tbf(host.ns, host.dev, up_mbit, burst, latency)
        _set_tbf(self.switch_ns, host.switch_dev, down_mbit, burst, latency)

    def link_down(self, i: int) -> None:
        """Cut host ``i`` off: its switch port goes down and every packet to or from it vanishes, no RST, no ICMP.

        The host keeps its address and routes, but its veth sees the carrier go (operstate DOWN, like a pulled
        cable): a process that watches link state could notice, TCP does not (it retransmits until ``link_up``).
        """
        _run(["ip", "-n", self.switch_ns, "link", "set", self.host(i).switch_dev, "down"])

    def link_up(self, i: int) -> None:
        _run(["ip", "-n", self.switch_ns, "link", "set", self.host(i).switch_dev, "up"])

    def counters(self, i: int) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of host ``i``'s veth, as its own namespace counts them."""
        host = self.host(i)
        stats = json.loads(_run(["ip", "-n", host.ns, "-s", "-j", "link", "show", "dev", host.dev]))[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]

    def probe_rtts(self, src: int, dst: int, count: int = 10, timeout_s: float = 1.0,
                   interval_s: float = 0.05) -> list[float | None]:
        """ICMP echo round trips in ms from host ``src`` to host ``dst``; None for each probe left unanswered."""
        argv = _probe_argv("ping", self.host(dst).ip, count, timeout_s, interval_s)
        return json.loads(_run(self.host(src).cmd(argv), timeout=count * (timeout_s + interval_s) + 30))

    def ping_rtt_ms(self, src: int, dst: int, count: int = 10) -> float:
        """Median ICMP round trip in ms; raises ``Unreachable`` when no probe is answered."""
        answered = [rtt for rtt in self.probe_rtts(src, dst, count) if rtt is not None]
        if not answered:
            raise Unreachable(f"host {dst} ({self.host(dst).ip}) answered none of {count} pings from host {src}")
        return statistics.median(answered)

    def throughput_mbps(self, src: int, dst: int, seconds: float = 3.0) -> float:
        """Goodput of one TCP stream from ``src`` to ``dst`` sending for ``seconds`` (first to last byte)."""
        receiver = subprocess.Popen(self.host(dst).cmd(_probe_argv("tcp-receive", self.host(dst).ip)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = _read_line(receiver, timeout_s=20)
            _run(self.host(src).cmd(_probe_argv("tcp-send", self.host(dst).ip, port, seconds)), timeout=seconds + 60)
            out, err = receiver.communicate(timeout=60)
        finally:
            receiver.kill()
            receiver.wait()
        if receiver.returncode != 0:
            raise LabError(f"throughput receiver failed: {err.strip()}")
        result = json.loads(out)
        return result["bytes"] * 8 / max(result["seconds"], 1e-9) / 1e6

    def close(self) -> None:
        """Kill every process in the lab's namespaces, the delay line included, and delete the namespaces."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proc in self._procs:
            _kill_group(proc)
        if self._delayline is not None:
            self._stop_delayline()
        for ns in self.namespaces():
            _delete_namespace(ns)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        left = sorted(set(self.namespaces()) & set(list_namespaces()))
        if left:
            raise LabError(f"namespaces left behind: {left}")

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.switch_ns])
        _run(["ip", "-n", self.switch_ns, "link", "set", "lo", "up"])
        for host in self.hosts:
            _run(["ip", "netns", "add", host.ns])
            _run(["ip", "link", "add", host.dev, "netns", host.ns, "type", "veth",
                  "peer", "name", host.switch_dev, "netns", self.switch_ns])
            if self.rtt_ms > 0:  # full frames only: a packet socket cannot resend a 64 kB TSO/GRO super-frame
                _run(host.cmd([str(build_delayline()), "--no-offload", host.dev]))
            _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.dev])
            _run(["ip", "-n", host.ns, "link", "set", host.dev, "up"])
            _run(["ip", "-n", host.ns, "link", "set", "lo", "up"])
        if self.rtt_ms > 0:
            self._start_delayline()
        else:
            self._start_bridge()

    def _start_bridge(self) -> None:
        _run(["ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0"])
        for host in self.hosts:
            _run(["ip", "-n", self.switch_ns, "link", "set", host.switch_dev, "master", "br0", "up"])
        _run(["ip", "-n", self.switch_ns, "link", "set", "br0", "up"])

    def _start_delayline(self) -> None:
        for host in self.hosts:
            _run(["ip", "-n", self.switch_ns, "link", "set", host.switch_dev, "up"])
        delay_us = round(self.rtt_ms * 1000 / 2)
        argv = ["ip", "netns", "exec", self.switch_ns, str(build_delayline()), str(delay_us),
                *(h.switch_dev for h in self.hosts)]
        with open(self.log_dir / "delayline.log", "wb") as log:
            self._delayline = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                               start_new_session=True)
        if _read_line(self._delayline, timeout_s=20) != "ready":
            raise LabError(f"delayline did not start: {(self.log_dir / 'delayline.log').read_text()}")

    def _stop_delayline(self) -> None:
        proc = self._delayline
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
        log = self.log_dir / "delayline.log"
        self.delayline_report = log.read_text().strip() if log.exists() else ""


class UploadMeter:
    """Samples host ``i``'s byte counters every ``period_s`` in a thread, for rates over sliding windows.

        with UploadMeter(lab, 0) as meter:
            ...  # traffic
        assert meter.max_rate_mbps(window_s=10) < 21
    """

    def __init__(self, lab: Lab, i: int, period_s: float = 0.5):
        self.lab = lab
        self.index = i
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic time, tx_bytes, rx_bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"upload-meter-{i}", daemon=True)

    def __enter__(self) -> UploadMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling; a last sample is taken while the lab is still open."""
        self._stop.set()
        self._thread.join()
        if not self.lab.closed:
            self._sample()

    def max_rate_mbps(self, window_s: float = 10.0, direction: str = "tx") -> float:
        """Highest rate over any window of at least ``window_s`` (the whole run when it is shorter)."""
        samples = list(self.samples)
        col = _direction_column(direction)
        best = 0.0
        j = 0
        for i in range(len(samples)):
            while j < len(samples) and samples[j][0] - samples[i][0] < window_s:
                j += 1
            end = samples[j] if j < len(samples) else samples[-1]
            if j == len(samples) and i > 0:
                break  # windows from here on are shorter than window_s; the i == 0 one stands for the whole run
            best = max(best, _rate_mbps(samples[i], end, col))
        return best

    def mean_rate_mbps(self, direction: str = "tx") -> float:
        samples = list(self.samples)
        return _rate_mbps(samples[0], samples[-1], _direction_column(direction)) if len(samples) > 1 else 0.0

    def _sample(self) -> None:
        tx, rx = self.lab.counters(self.index)
        self.samples.append((time.monotonic(), tx, rx))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._sample()
            except LabError:
                return  # the lab is gone; stop() takes no further sample either


def missing_requirements(delay_line: bool = True) -> list[str]:
    """What this machine lacks to build a lab (empty when nothing): root, iproute2, tc, gcc for the delay line."""
    missing = [] if os.geteuid() == 0 else ["root (network namespaces)"]
    missing += [f"`{tool}` ({pkg})" for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"))
                if shutil.which(tool) is None]
    if delay_line and shutil.which("gcc") is None:
        missing.append("`gcc` (to compile scripts/delayline.c)")
    return missing


def build_delayline() -> Path:
    """The compiled delay line, built once per source version into a cache folder."""
    source = Path(__file__).resolve().with_name("delayline.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()) / "swarmtrain-lab"
    binary = cache / f"delayline-{digest}"
    if binary.exists():
        return binary
    if shutil.which("gcc") is None:
        raise LabError("the delay line (rtt_ms > 0) needs gcc to compile scripts/delayline.c")
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".delayline-{digest}-{os.getpid()}"
    _run(["gcc", "-O2", "-Wall", "-o", str(partial), str(source)], timeout=120)
    os.replace(partial, binary)  # atomic: concurrent builders each install a complete binary
    return binary


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete the namespaces (and kill the processes in them) of labs whose creating process is gone."""
    removed = []
    for ns in list_namespaces():
        match = _NS_RE.match(ns)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


def _run(argv: list[str], timeout: float = 30) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _set_tbf(ns: str, dev: str, mbit: float | None, burst: str, latency: str) -> None:
    if mbit is None:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
        return  # no error: "no cap" is also what a link without a qdisc has
    _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{round(mbit * 1000)}kbit",
          "burst", burst, "latency", latency])


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The next stdout line of ``proc`` (text mode), or LabError if none comes within ``timeout_s``."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise LabError(f"`{' '.join(map(str, proc.args))}` printed nothing within {timeout_s} s")
    return line.strip()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    proc.wait()


def _delete_namespace(ns: str, timeout_s: float = 10.0) -> None:
    """Kill every process in ``ns`` until none is left, then delete it."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        if not pids:
            break
        if time.monotonic() > deadline:
            raise LabError(f"processes {pids} survive SIGKILL in namespace {ns}")
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _direction_column(direction: str) -> int:
    if direction not in ("tx", "rx"):
        raise ValueError(f"direction is 'tx' or 'rx', not {direction!r}")
    return 1 if direction == "tx" else 2


def _rate_mbps(start: tuple[float, int, int], end: tuple[float, int, int], col: int) -> float:
    seconds = end[0] - start[0]
    return (end[col] - start[col]) * 8 / seconds / 1e6 if seconds > 0 else 0.0


# Probes: run by ``python netlab.py <probe> ARGS...`` inside a host's namespace, results on stdout.

def _icmp_echo(sock: socket.socket, dst: str, ident: int, seq: int, timeout_s: float) -> float | None:
    """One ICMP echo round trip in ms over a raw socket, or None when unanswered."""
    payload = b"netlab.." * 7
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    words = sum(struct.unpack(f"!{len(header + payload) // 2}H", header + payload))
    words = (words >> 16) + (words & 0xFFFF)
    t0 = time.monotonic()
    try:
        sock.sendto(struct.pack("!BBHHH", 8, 0, ~(words + (words >> 16)) & 0xFFFF, ident, seq) + payload, (dst, 0))
    except OSError:
        return None  # e.g. EHOSTUNREACH once ARP has failed
    while (left := t0 + timeout_s - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
        data, addr = sock.recvfrom(4096)
        ihl = (data[0] & 15) * 4
        kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if kind == 0 and (rid, rseq, addr[0]) == (ident, seq, dst):
            return (time.monotonic() - t0) * 1000
    return None


def _probe_ping(dst: str, count: str, timeout_s: str, interval_s: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    rtts = []
    for seq in range(int(count)):
        rtts.append(_icmp_echo(sock, dst, os.getpid() & 0xFFFF, seq, float(timeout_s)))
        time.sleep(float(interval_s))
    print(json.dumps(rtts))


def _probe_tcp_receive(bind_ip: str) -> None:
    """Print the port, accept one stream, print {"bytes", "seconds" (first to last byte)} at its end."""
    server = socket.create_server((bind_ip, 0))
    server.settimeout(60)
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    conn.settimeout(60)
    buf, n, first, last = bytearray(1 << 20), 0, 0.0, 0.0
    while k := conn.recv_into(buf):
        last = time.monotonic()
        first = first or last
        n += k
    print(json.dumps({"bytes": n, "seconds": last - first}))


def _probe_tcp_send(dst: str, port: str, seconds: str) -> None:
    """Send as fast as TCP allows for ``seconds``, then close and wait for the receiver to close."""
    sock = socket.create_connection((dst, int(port)), timeout=10)
    sock.settimeout(60)
    chunk, deadline = b"\0" * (256 << 10), time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)


_PROBES = {"ping": _probe_ping, "tcp-receive": _probe_tcp_receive, "tcp-send": _probe_tcp_send}


def _probe_argv(probe: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), probe, *map(str, args)]


def _selftest() -> None:
    with Lab(2) as lab:
        print(f"bridge:    ping {lab.ping_rtt_ms(0, 1):.2f} ms, tcp {lab.throughput_mbps(0, 1):.0f} Mbit/s")
    with Lab(2, rtt_ms=50) as lab:
        print(f"delayline: ping {lab.ping_rtt_ms(0, 1):.2f} ms (50 asked), "
              f"tcp {lab.throughput_mbps(0, 1):.0f} Mbit/s")
        lab.cap(0, up_mbit=20, down_mbit=None)
        with UploadMeter(lab, 0) as meter:
            capped = lab.throughput_mbps(0, 1)
        print(f"capped 20: tcp {capped:.1f} Mbit/s, meter max(1 s) {meter.max_rate_mbps(1):.1f} Mbit/s")
        lab.link_down(1)
        lost = lab.probe_rtts(0, 1, count=3, timeout_s=0.5).count(None)
        lab.link_up(1)
        print(f"link_down: {lost}/3 pings lost; after link_up: {lab.ping_rtt_ms(0, 1, count=3):.1f} ms")
    print(lab.delayline_report)


def main(argv: list[str]) -> int:
    if argv[:1] == ["selftest"]:
        missing = missing_requirements()
        if missing:
            print(f"netlab needs {', '.join(missing)}", file=sys.stderr)
            return 1
        _selftest()
        return 0
    if argv and argv[0] in _PROBES:
        _PROBES[argv[0]](*argv[1:])
        return 0
    if argv[:1] == ["cleanup"]:
        print("\n".join(cleanup_stale()) or "no stale lab namespaces")
        return 0
    print("usage: netlab.py selftest | cleanup", file=sys.stderr)  # probes are internal
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
