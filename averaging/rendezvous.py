"""Finding averaging partners: this node's rendezvous record in the DHT, partner choice, and penalties.

One :class:`Rendezvous` per node publishes a single :class:`~swarmtrain.dht.records.AveragingRecord` listing
every group the node averages (the replicated parameters, and one group per expert it hosts a replica of), so
several averagers on one node share it. Partners are peers whose live record lists the same group. Peers that
failed an exchange are skipped for a while (:class:`Penalties`), longer after each strike and much longer for
sending bad tensors.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, Optional

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.keys import RecordKind
from swarmtrain.dht.records import AveragingRecord

logger = logging.getLogger(__name__)


class Rendezvous:
    """This node's entry in the averaging directory, shared by all its averagers.

    :param directory: the run's directory (reads and signed writes)
    :param ttl_s: lifetime of the published record; it is refreshed every ``ttl_s / 3``
    :param refresh_s: how long a read of other peers' records is reused before asking the DHT again
    """

    def __init__(self, directory: SwarmDirectory, ttl_s: float = 10.0, refresh_s: float = 1.0):
        if not ttl_s > 0:
            raise ValueError(f"rendezvous ttl_s must be > 0, got {ttl_s}")
        self.directory = directory
        self.peer_id = directory.peer_id
        self.ttl_s, self.refresh_s = ttl_s, refresh_s
        self._groups: dict[str, Callable[[], int]] = {}  # group -> samples counter of its averager
        self._last_announce = -float("inf")
        self._dirty = True
        self._cache: Optional[tuple[float, dict[str, AveragingRecord]]] = None

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def join(self, group: str, samples: Callable[[], int]) -> None:
        """Announce ``group`` from the next :meth:`announce` on; ``samples()`` gives the samples to advertise."""
        if group in self._groups:
            raise ValueError(f"group {group!r} already has an averager on this node")
        self._groups[group] = samples
        self._dirty = True

    def leave(self, group: str) -> None:
        self._groups.pop(group, None)
        self._dirty = True

    async def announce(self, force: bool = False) -> bool:
        """Publish this node's record if it changed or is due for refresh; True if stored (or not due)."""
        now = time.monotonic()
        if not (force or self._dirty or now - self._last_announce > self.ttl_s / 3):
            return True
        samples = max((counter() for counter in self._groups.values()), default=0)
        record = AveragingRecord(peer_id=self.peer_id, groups=self.groups, samples=samples, time=time.time())
        stored = await self.directory.apublish(RecordKind.AVERAGING, record, ttl_s=self.ttl_s)
        if stored:
            self._last_announce, self._dirty = now, False
        else:
            logger.warning(f"could not store the averaging rendezvous record of groups {list(self.groups)}")
        return stored

    async def partners(self, group: str, fresh: bool = False) -> dict[str, AveragingRecord]:
        """Live records of other peers that average ``group`` (cached for ``refresh_s`` unless ``fresh``)."""
        now = time.monotonic()
        if fresh or self._cache is None or now - self._cache[0] > self.refresh_s:
            found = await self.directory.aread(RecordKind.AVERAGING, latest=True)
            self._cache = (now, {peer: record for peer, (record, _) in found.items()})
        return {
            peer: record for peer, record in self._cache[1].items() if peer != self.peer_id and group in record.groups
        }


class Penalties:
    """Which partners to skip for now. A strike bans a peer for ``base_s * 2 ** (strikes - 1)`` (at most
    ``max_s``); a bad-tensor strike counts as ``severe`` strikes at once and also makes the peer ``distrusted``
    (its own requests are refused) for as long; a good exchange clears them.

    A peer that only failed to answer us (a dead or black-holed host, a timeout) is skipped for at most
    ``max_unreachable_s``: it is retried soon, so a peer whose cable comes back rejoins within seconds, and its
    own requests are served meanwhile (it evidently reaches us again). A peer that failed an exchange *it*
    started is refused for the length of its ban too.
    """

    def __init__(self, base_s: float, max_s: float = 300.0, severe: int = 4, max_unreachable_s: float = 300.0):
        self.base_s, self.max_s, self.severe, self.max_unreachable_s = base_s, max_s, severe, max_unreachable_s
        self._strikes: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}
        self._distrusted_until: dict[str, float] = {}

    def strike(self, peer: str, bad_data: bool = False, refuse: bool = False) -> float:
        """Penalize ``peer``; returns how many seconds it is now skipped. ``refuse``: also refuse its requests
        meanwhile (it reached us and then failed an exchange it started: stalling us is no way to get served)."""
        strikes = self._strikes.get(peer, 0) + (self.severe if bad_data else 1)
        self._strikes[peer] = strikes
        duration = min(self.max_s, self.base_s * 2 ** min(strikes - 1, 30))
        if not bad_data:
            duration = min(duration, self.max_unreachable_s)
        until = time.monotonic() + duration
        self._banned_until[peer] = max(until, self._banned_until.get(peer, 0.0))
        if bad_data or refuse:
            self._distrusted_until[peer] = max(until, self._distrusted_until.get(peer, 0.0))
        return self._banned_until[peer] - time.monotonic()

    def forgive(self, peer: str) -> None:
        self._strikes.pop(peer, None)
        self._banned_until.pop(peer, None)
        self._distrusted_until.pop(peer, None)

    def banned(self, peer: str) -> bool:
        """Skip ``peer`` when choosing partners."""
        return time.monotonic() < self._banned_until.get(peer, 0.0)

    def distrusted(self, peer: str) -> bool:
        """Refuse exchanges ``peer`` starts: it sent bad data."""
        return time.monotonic() < self._distrusted_until.get(peer, 0.0)


def choose_partners(candidates: list[str], last_met: dict[str, float], rng: random.Random, limit: int = 3,
                    last: Optional[str] = None) -> list[str]:
    """Order ``candidates`` to try: those met least recently first (random among equals), at most ``limit``;
    never ``last`` (the partner of our previous exchange) while there is anyone else.

    Meeting the least recently met peer spreads information like a hypercube all-reduce when the swarm is small,
    instead of re-averaging with a partner whose values are already close to ours. Excluding the previous partner
    matters when the others are busy: two pairs that always found each other busy would otherwise keep averaging
    within themselves and the swarm would split into pairs.
    """
    if last is not None and len(candidates) > 1:
        candidates = [peer for peer in candidates if peer != last]
    shuffled = list(candidates)
    rng.shuffle(shuffled)
    shuffled.sort(key=lambda peer: last_met.get(peer, -float("inf")))
    return shuffled[:limit]
