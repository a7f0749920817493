"""What the dashboard remembers about each peer between polls: liveness, heartbeat age and monotonic counters.

The DHT only holds each peer's latest heartbeat, and only until it expires; the dashboard wants more: peers that
went away ("gone"), how old a heartbeat really is, and swarm totals (samples, averaging rounds and bytes) that do
not drop when a peer restarts or leaves. :class:`PeerBook` keeps that, fed one poll at a time.

Not for reading the DHT (see :mod:`swarmtrain.dashboard.collector`) nor for shaping the API (see
:mod:`swarmtrain.dashboard.state`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from swarmtrain.dht.records import Heartbeat

COUNTERS: tuple[str, ...] = ("samples", "averaging_rounds", "averaging_bytes")


class PeerState(str, enum.Enum):
    """online: heartbeat live and fresh; stale: live but older than 2 heartbeat periods; gone: expired or missing."""

    ONLINE = "online"
    STALE = "stale"
    GONE = "gone"


@dataclass
class PeerTrack:
    """One peer as the dashboard has seen it (times are this machine's unix seconds)."""

    peer_id: str
    heartbeat: Heartbeat
    expires_at: float  # DHT expiration of the latest heartbeat record
    first_seen: float
    last_seen: float  # last poll at which a live heartbeat was found
    record_seen_at: float  # when this poll loop first saw the current heartbeat (its ``time``)
    last_round_at: float  # when its averaging_rounds counter last grew (first_seen until then)
    gone_since: Optional[float] = None
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))  # sums before counter resets

    def heartbeat_age(self, now: float) -> float:
        """Seconds since the peer published its current heartbeat.

        The peer's own timestamp is used (the DHT already assumes synchronized clocks for expiration), but never
        less than the time since this dashboard first saw that heartbeat, so a peer whose clock runs ahead still
        ages once it stops publishing.
        """
        return max(0.0, now - self.heartbeat.time, now - self.record_seen_at)

    def total(self, counter: str) -> int:
        """A cumulative counter of this peer, carried across its restarts."""
        return self.base[counter] + int(getattr(self.heartbeat, counter))

    def state(self, now: float, stale_after_s: float) -> PeerState:
        if self.gone_since is not None or self.expires_at < now:
            return PeerState.GONE
        return PeerState.STALE if self.heartbeat_age(now) > stale_after_s else PeerState.ONLINE


class PeerBook:
    """Peers seen so far, updated from each poll's heartbeats.

    :param gone_keep_s: forget a gone peer after this long
    :param max_peers: never track more peers than this (the longest-gone are forgotten first)

    ``observed`` holds swarm-wide counter increments seen by this dashboard (for rates: a peer that joins with
    1000 samples already done adds nothing to it); ``totals()`` sums every known peer's cumulative counters.
    """

    def __init__(self, gone_keep_s: float = 3600.0, max_peers: int = 2000):
        self.gone_keep_s = float(gone_keep_s)
        self.max_peers = int(max_peers)
        self.peers: dict[str, PeerTrack] = {}
        self.observed: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._forgotten: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def update(self, heartbeats: dict[str, tuple[Heartbeat, float]], now: float) -> None:
        """Apply one poll's live heartbeats ``{peer id: (heartbeat, expiration)}`` read at time ``now``."""
        for peer_id, (hb, expires_at) in heartbeats.items():
            track = self.peers.get(peer_id)
            if track is None:
                self.peers[peer_id] = PeerTrack(
                    peer_id=peer_id, heartbeat=hb, expires_at=expires_at, first_seen=now, last_seen=now,
                    record_seen_at=now, last_round_at=now,
                )
                continue
            if hb.time != track.heartbeat.time:
                track.record_seen_at = now
            self._count(track, hb, now)
            track.heartbeat, track.expires_at, track.last_seen, track.gone_since = hb, expires_at, now, None
        for peer_id, track in self.peers.items():
            # a record cannot be deleted before it expires, so one missing earlier was lost by the read (a node
            # that timed out): the peer ages into "stale" instead, and is gone once its record has expired
            if peer_id not in heartbeats and track.gone_since is None and track.expires_at <= now:
                track.gone_since = now
        self._forget(now)

    def totals(self) -> dict[str, int]:
        """Every known peer's cumulative counters summed (peers forgotten since included)."""
        result = dict(self._forgotten)
        for track in self.peers.values():
            for counter in COUNTERS:
                result[counter] += track.total(counter)
        return result

    def _count(self, track: PeerTrack, hb: Heartbeat, now: float) -> None:
        for counter in COUNTERS:
            before, after = int(getattr(track.heartbeat, counter)), int(getattr(hb, counter))
            if after >= before:
                self.observed[counter] += after - before
            else:  # the peer restarted under the same id: its counter began again from zero
                track.base[counter] += before
                self.observed[counter] += after
        if hb.averaging_rounds != track.heartbeat.averaging_rounds:
            track.last_round_at = now

    def _forget(self, now: float) -> None:
        gone = sorted((t.gone_since, pid) for pid, t in self.peers.items() if t.gone_since is not None)
        excess = len(self.peers) - self.max_peers
        for gone_since, peer_id in gone:
            if now - gone_since <= self.gone_keep_s and excess <= 0:
                break
            track = self.peers.pop(peer_id)
            excess -= 1
            for counter in COUNTERS:
                self._forgotten[counter] += track.total(counter)
