"""What this peer knows of its link to each expert host, and the policies derived from it.

Every remote expert call ends in :meth:`LinkTable.observe` with its wall time, the bytes it moved and the time
the host says it spent computing; from the recent calls to one host :class:`LinkStats` keeps latency
percentiles and a transfer-rate estimate. Pure functions turn those into decisions:

- :func:`call_deadline`: how long to wait for a call before giving up on that host, from its latency
  percentiles and the bytes to move (instead of one fixed timeout: a black-holed host costs a fraction of a
  second on a LAN, a slow home link gets the time its bytes need); a host with fewer than 3 calls measured
  gets the deadline of all hosts' calls together;
- :func:`hedge_after`: when to also ask another replica of the expert;
- :func:`wire_codec`: 8-bit activations and gradients on slow or unmeasured links, float32 on links measured
  faster than the codec itself (rates count float32 bytes of the layer, so both codecs compare on one scale);
- :func:`classify_timeout`: whether a call past its deadline means a black hole, a slow host or our own queue;
- :func:`call_cost`: the routing cost of calling a host, 0 (in-process) to 1 (slow or unknown), which the gate
  of :class:`~swarmtrain.peer.model.MoE` subtracts from its logits (communication-aware routing).

Not for: making calls (:mod:`~swarmtrain.expert_pool.client`), banning hosts (``HostBans``), or the bandwidth
budget of the whole peer (:mod:`~swarmtrain.dht.budget`).
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional

# activations cross the wire uncompressed only on links measured faster than this (bytes/s): blockwise 8-bit
# encodes + decodes at ~400 MB/s on one core, so it saves time on any slower link
FAST_LINK_BPS = 50e6


@dataclass(frozen=True)
class LinkPolicy:
    """Knobs of the policies below (defaults suit home links and LANs alike).

    :param min_deadline_s: never give up on a call sooner (scheduling hiccups of a busy host)
    :param max_deadline_s: never wait longer (the manifest's ``expert_pool.timeout_s``)
    :param unknown_deadline_s: deadline for a host with no measured call yet
    :param slack: deadline = ``slack`` x the p95 latency of the host + the transfer time of the call's bytes
    :param cost_ref_s: a call whose median latency reaches this costs 1 (the most) in routing
    :param remote_floor: the least routing cost of any remote call (it still costs CPU on both sides)
    """

    min_deadline_s: float = 0.75
    max_deadline_s: float = 15.0
    unknown_deadline_s: float = 4.0
    slack: float = 3.0
    cost_ref_s: float = 0.25
    remote_floor: float = 0.25


class LinkStats:
    """Recent calls to one host: (wall seconds, network seconds, bytes moved), at most ``window`` of them."""

    def __init__(self, window: int = 64):
        self.calls: deque[tuple[float, float, int]] = deque(maxlen=window)
        self.late = 0  # answers that arrived after their call had given up (a slow host, not a dead one)

    def observe(self, seconds: float, nbytes: int, server_s: float = 0.0) -> None:
        if not (math.isfinite(seconds) and math.isfinite(server_s)):
            return
        network = max(seconds - max(server_s, 0.0), 1e-4)
        self.calls.append((max(seconds, 0.0), network, max(int(nbytes), 0)))

    def latency(self, q: float) -> Optional[float]:
        """The ``q``-quantile (0..1) of recent call wall times, None before the first call."""
        if not self.calls:
            return None
        ordered = sorted(seconds for seconds, _, _ in self.calls)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def rate_bps(self) -> Optional[float]:
        """Bytes per second the link moved in the calls that moved the most (their network time, i.e. without
        the host's compute); None until a call of at least 16 KiB was measured."""
        big = sorted(((nbytes / network) for _, network, nbytes in self.calls if nbytes >= 16384), reverse=True)
        return big[len(big) // 4] if big else None  # upper quartile: queueing behind other calls only lowers it


def call_deadline(stats: Optional[LinkStats], nbytes: int, policy: LinkPolicy) -> float:
    """Seconds to wait for a call moving ``nbytes`` to a host with ``stats`` before giving up on that host."""
    if stats is None or len(stats.calls) < 3:
        return min(policy.unknown_deadline_s, policy.max_deadline_s)
    p95 = stats.latency(0.95) or 0.0
    rate = stats.rate_bps()
    transfer = nbytes / rate if rate else 0.0
    return min(max(policy.slack * p95 + 2 * transfer, policy.min_deadline_s), policy.max_deadline_s)


def hedge_after(stats: Optional[LinkStats], policy: LinkPolicy) -> float:
    """Seconds after which a forward call still unanswered is also sent to another replica."""
    if stats is None or len(stats.calls) < 3:
        return policy.min_deadline_s
    return max(1.5 * (stats.latency(0.95) or 0.0), 0.5 * policy.min_deadline_s)


def wire_codec(stats: Optional[LinkStats], configured: str) -> str:
    """The codec of a call to this host: ``configured`` unless it is ``"auto"``, which means blockwise 8-bit
    on links not (yet) measured faster than :data:`FAST_LINK_BPS`, float32 on faster ones."""
    if configured != "auto":
        return configured
    rate = stats.rate_bps() if stats is not None else None
    return "none" if rate is not None and rate >= FAST_LINK_BPS else "blockwise8"


def call_cost(stats: Optional[LinkStats], policy: LinkPolicy) -> float:
    """Routing cost of calling this remote host, in ``[remote_floor, 1]``: its median latency over
    ``cost_ref_s``; 1 for a host never measured."""
    median = stats.latency(0.5) if stats is not None else None
    if median is None:
        return 1.0
    return min(1.0, max(policy.remote_floor, median / policy.cost_ref_s))


UNSENT, SLOW, SILENT = "unsent", "slow", "silent"


def classify_timeout(sent_at: Optional[float], last_heard: Optional[float]) -> str:
    """What a call that ran past its deadline says about its host: ``"unsent"`` if the request never fully left
    (it waited in our own upload budget: our uplink, not the host, is slow), ``"slow"`` if the host sent something
    after the request left (alive; its late answer will widen its deadline), else ``"silent"`` (a black hole or a
    dead host: ban it)."""
    if sent_at is None:
        return UNSENT
    if last_heard is not None and last_heard > sent_at:
        return SLOW
    return SILENT


class LinkTable:
    """:class:`LinkStats` per host peer id, with the policies applied to each; every method may be called from
    any thread (the event loop records calls while the training thread reads costs)."""

    def __init__(self, policy: LinkPolicy = LinkPolicy()):
        self.policy = policy
        self._stats: dict[str, LinkStats] = {}
        self._swarm = LinkStats(window=256)  # every host's calls: the prior for a host not measured yet
        self._lock = threading.Lock()

    def observe(self, host: str, seconds: float, nbytes: int, server_s: float = 0.0) -> None:
        with self._lock:
            self._stats.setdefault(host, LinkStats()).observe(seconds, nbytes, server_s)
            self._swarm.observe(seconds, nbytes, server_s)

    def observe_late(self, host: str, seconds: float) -> None:
        """An answer came ``seconds`` after its call, which had already given up: widen the host's deadline."""
        with self._lock:
            stats = self._stats.setdefault(host, LinkStats())
            stats.late += 1
            stats.observe(seconds, 0)

    def _measured(self, host: str) -> Optional[LinkStats]:
        """The host's own stats once it has a few calls, else those of all hosts (a black hole we never called
        is found as fast as the swarm's links allow, not after the unknown-host deadline). Call under the lock."""
        stats = self._stats.get(host)
        return stats if stats is not None and len(stats.calls) >= 3 else self._swarm

    def deadline(self, host: str, nbytes: int) -> float:
        with self._lock:
            return call_deadline(self._measured(host), nbytes, self.policy)

    def hedge_after(self, host: str) -> float:
        with self._lock:
            return hedge_after(self._measured(host), self.policy)

    def codec(self, host: str, configured: str) -> str:
        with self._lock:
            return wire_codec(self._stats.get(host), configured)

    def cost(self, host: str) -> float:
        with self._lock:
            return call_cost(self._stats.get(host), self.policy)

    def summary(self) -> dict[str, dict]:
        """Per host: calls measured, p50/p95 latency (s), rate (bytes/s), late answers (for logs and benchmarks)."""
        with self._lock:
            return {
                host: {"calls": len(s.calls), "p50_s": s.latency(0.5), "p95_s": s.latency(0.95),
                       "rate_bps": s.rate_bps(), "late": s.late}
                for host, s in self._stats.items()
            }
