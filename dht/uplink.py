"""What this peer's p2p daemons really send, and the upload budget corrected by it.

The upload budget (:mod:`~swarmtrain.dht.budget`) paces the payloads this process writes, but more leaves the
machine: libp2p's encryption and framing, TCP retransmissions, and the DHT's own traffic (records this node
stores and serves to others, run by hivemind in its own process), which at a cap of a few Mbit/s is a large part
of the whole. :class:`UplinkMonitor` reads, every ``period_s``, the bytes the kernel says the TCP sockets of this
peer's ``p2pd`` daemons have put on the wire (``tcp_info`` ``bytes_sent`` and ``segs_out`` x the headers of a
segment, through iproute2's ``ss``), and gives the paced traffic what the rest leaves of the cap:
``paced rate = cap x (1 - margin) - (sent - paced)``, the unpaced part smoothed.

Not for: pacing (the budget does), other processes' traffic, or machines without ``ss`` (then the budget keeps
its fixed overhead allowance and the monitor says so once).
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from typing import Callable, Iterable, Optional

import psutil

from swarmtrain.dht.budget import UploadBudget

logger = logging.getLogger(__name__)

FRAME_BYTES = 66  # Ethernet + IPv4 + TCP (with timestamps) headers of one segment: what bytes_sent leaves out
MARGIN = 0.03  # of the cap, kept free for what the readings miss between two of them
_SOCKET = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s+.*users:\(\((.*)\)\)")
_PID = re.compile(r"pid=(\d+)")
_SENT = re.compile(r"\bbytes_sent:(\d+)")
_SEGS = re.compile(r"\bsegs_out:(\d+)")


def parse_ss(text: str, pids: Iterable[int]) -> dict[tuple[str, str], int]:
    """``{(local, remote): bytes on the wire}`` of the TCP sockets owned by ``pids`` in ``ss -tinpH`` output: the
    payload the kernel sent (``bytes_sent``, retransmissions included) plus the headers of every segment it sent
    (``segs_out``, pure ACKs included)."""
    pids = {str(pid) for pid in pids}
    sockets, key = {}, None
    for line in text.splitlines():
        head = _SOCKET.match(line)
        if head is not None:
            key = (head.group(1), head.group(2)) if pids & set(_PID.findall(head.group(3))) else None
            continue
        sent, segments = _SENT.search(line), _SEGS.search(line)
        if key is not None and sent is not None:
            sockets[key] = int(sent.group(1)) + FRAME_BYTES * (int(segments.group(1)) if segments else 0)
            key = None
    return sockets


def paced_rate(cap_bytes_per_s: float, sent_per_s: float, paced_per_s: float, floor: float = 0.1) -> float:
    """Bytes per second the paced traffic may use: the cap less headers, less what left unpaced (everything the
    sockets sent beyond our paced payloads); at least ``floor`` of the cap, so that pacing never stops."""
    unpaced = max(0.0, sent_per_s - paced_per_s)
    return max(floor * cap_bytes_per_s, cap_bytes_per_s * (1 - MARGIN) - unpaced)


class UplinkMonitor:
    """Corrects ``budget``'s rate from what this process tree's p2pd sockets send (see the module docstring).

    :param budget: a limited upload budget (its ``mbps`` is the cap)
    :param period_s: seconds between readings
    :param read_ss: returns ``ss -tinpH`` output (injectable for tests); default runs ``ss``
    :param pids: returns the pids whose sockets count; default: the p2pd daemons of this process tree
    """

    def __init__(self, budget: UploadBudget, period_s: float = 1.0, read_ss: Optional[Callable[[], str]] = None,
                 pids: Optional[Callable[[], list[int]]] = None):
        if not budget.limited:
            raise ValueError("UplinkMonitor needs a limited budget")
        self.budget, self.period_s = budget, period_s
        self.cap = budget.mbps * 1e6 / 8
        self._read_ss = read_ss or _run_ss
        self._pids = pids or _p2pd_pids
        self._last: dict[tuple[str, str], int] = {}
        self._paced_before = sum(budget.sent.values())
        self._unpaced: Optional[float] = None  # smoothed bytes/s sent beyond our paced payloads
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def available() -> bool:
        return shutil.which("ss") is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def update(self, seconds: float) -> float:
        """One reading ``seconds`` after the previous; sets and returns the budget's new rate (bytes/s)."""
        sockets = parse_ss(self._read_ss(), self._pids())
        sent = sum(max(0, value - self._last.get(key, 0)) for key, value in sockets.items())
        self._last = sockets
        paced_now = sum(self.budget.sent.values())
        paced, self._paced_before = paced_now - self._paced_before, paced_now
        unpaced = max(0.0, (sent - paced) / seconds)
        self._unpaced = unpaced if self._unpaced is None else 0.7 * self._unpaced + 0.3 * unpaced
        rate = paced_rate(self.cap, self._unpaced + paced / seconds, paced / seconds)
        self.budget.set_rate(rate)
        return rate

    def baseline(self) -> None:
        """Remember what was sent so far (the first reading must not count a connection's whole history)."""
        self._last = parse_ss(self._read_ss(), self._pids())
        self._paced_before = sum(self.budget.sent.values())

    def _run(self) -> None:
        try:
            self.baseline()
        except Exception as e:
            logger.warning(f"not correcting the upload budget: cannot read what p2pd sends ({type(e).__name__}: {e})")
            return
        while not self._stop.wait(self.period_s):
            try:
                self.update(self.period_s)
            except Exception as e:  # keep the last rate; say why once in a while
                logger.warning(f"could not read what p2pd sends ({type(e).__name__}: {e}); keeping the last rate")


def _run_ss() -> str:
    return subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=5, check=True).stdout


def _p2pd_pids() -> list[int]:
    """The p2pd daemons started by this process or its children (hivemind's DHT process runs one)."""
    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "p2pd":
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids
