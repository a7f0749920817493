"""Small helpers the benchmarks share for talking to their child processes over pipes and summarising repeats."""
from __future__ import annotations

import statistics


def recv(conn, proc, timeout: float = 180.0):
    """The next message from a child process; RuntimeError if it died or stayed silent for ``timeout`` s."""
    if not conn.poll(timeout):
        raise RuntimeError(f"process {proc.pid} {'died' if not proc.is_alive() else 'is silent'}")
    return conn.recv()


def expect(message, kind):
    """``message`` if it is a ``kind``; RuntimeError naming what came instead."""
    if not isinstance(message, kind):
        raise RuntimeError(f"child answered {message!r}, expected a {kind.__name__}")
    return message


def median(values):
    """Median of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
