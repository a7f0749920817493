"""This peer's upload budget: paces what it writes to other peers to ``--max-upload-mbps``, in two classes.

A home router has a deep buffer: a peer that writes faster than its uplink fills it, and every packet behind
the queue, expert calls and DHT records included, then waits up to seconds. Pacing our own writes just under
the uplink keeps that buffer empty, so the latency-critical traffic goes straight through.

Two traffic classes share the budget:

- ``interactive`` (expert calls and their answers) goes first: it waits only for earlier interactive bytes;
- ``bulk`` (averaging exchanges, state transfers) gets what is left: it also waits for every interactive byte
  scheduled so far, so together the two never exceed the rate for longer than one bulk message.

The budget is a virtual clock per class ("the link is busy until t"), not a token bucket with a burst: a message
of ``n`` bytes occupies the link for ``n / rate`` seconds, and its writer sleeps until its turn. Over any long
window the two classes together stay under the rate; for as long as the bulk messages already booked take (one
per concurrent bulk stream: each averager, each state transfer), interactive bytes booked meanwhile can go out
beside them, up to twice the rate. Bulk traffic waits as long as interactive traffic keeps the link busy.

``rate = mbps * 1e6 / 8 * (1 - overhead)``: ``overhead`` leaves room for what this module does not see (TCP/IP
and libp2p framing, ACKs of downloads, DHT traffic). Where the kernel can say what the p2p daemons really send,
:class:`~swarmtrain.dht.uplink.UplinkMonitor` replaces that guess with a measurement every second.

Not for: download limits (a peer cannot pace what others send it; ``--max-download-mbps`` only informs the
chunking of bulk messages), or deciding what to send (the callers do).

Example::

    budget = UploadBudget(20.0)                 # 20 Mbit/s uplink
    await budget.take(len(payload), BULK)       # on the event loop that writes the payload, before writing it
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

INTERACTIVE = "interactive"
BULK = "bulk"


class UploadBudget:
    """Paces writes to ``mbps`` megabits per second (None: unlimited, ``take`` returns at once).

    :param mbps: the uplink's rate as the volunteer declared it
    :param overhead: share of ``mbps`` left for framing, ACKs and unpaced traffic
    """

    def __init__(self, mbps: Optional[float] = None, overhead: float = 0.08):
        if mbps is not None and not (mbps > 0 and mbps < 1e6):
            raise ValueError(f"an upload budget must be a positive number of Mbit/s, got {mbps}")
        if not 0 <= overhead < 1:
            raise ValueError(f"overhead must be in [0, 1), got {overhead}")
        self.mbps = mbps
        self.rate = None if mbps is None else mbps * 1e6 / 8 * (1 - overhead)  # bytes per second
        self._free_at = {INTERACTIVE: 0.0, BULK: 0.0}
        self.sent = {INTERACTIVE: 0, BULK: 0}  # bytes booked per class (read by dht.uplink.UplinkMonitor)

    @property
    def limited(self) -> bool:
        return self.rate is not None

    def set_rate(self, bytes_per_s: float) -> None:
        """Change the paced rate (``dht.uplink.UplinkMonitor`` sets what unpaced traffic leaves of the cap)."""
        if self.rate is None or not bytes_per_s > 0:
            raise ValueError(f"can only set a positive rate of a limited budget, got {bytes_per_s}")
        self.rate = float(bytes_per_s)

    def schedule(self, nbytes: int, kind: str, now: float) -> float:
        """Book ``nbytes`` of class ``kind`` on the link; returns how long its writer must wait from ``now``."""
        if kind not in self._free_at:
            raise ValueError(f"unknown traffic class {kind!r}")
        self.sent[kind] += nbytes
        if self.rate is None:
            return 0.0
        duration = nbytes / self.rate
        if kind == INTERACTIVE:
            start = max(now, self._free_at[INTERACTIVE])
            self._free_at[INTERACTIVE] = start + duration
            self._free_at[BULK] = max(self._free_at[BULK], now) + duration  # bulk yields its time to us
        else:
            start = max(now, self._free_at[BULK], self._free_at[INTERACTIVE])
            self._free_at[BULK] = start + duration
        return start - now

    def cancel(self, nbytes: int, kind: str, now: float) -> None:
        """Give back a booking whose writer gave up before its turn (its bytes were never sent)."""
        self.sent[kind] -= nbytes
        if self.rate is not None:
            duration = nbytes / self.rate
            self._free_at[kind] = max(now, self._free_at[kind] - duration)
            if kind == INTERACTIVE:
                self._free_at[BULK] = max(now, self._free_at[BULK] - duration)

    async def take(self, nbytes: int, kind: str = BULK) -> None:
        """Wait for this writer's turn to send ``nbytes`` (call on the event loop that writes them); a writer
        cancelled while waiting gives its booking back."""
        wait = self.schedule(nbytes, kind, time.monotonic())
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                self.cancel(nbytes, kind, time.monotonic())
                raise
