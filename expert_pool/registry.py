"""Who hosts which expert: publishing this peer's experts and a TTL-cached view of everyone's.

Every peer that serves experts publishes one signed ``ExpertsRecord`` (its experts and their load) under the run's
``experts`` key with a TTL; a host that dies simply stops refreshing and its record expires. Readers keep a local
copy refreshed every ``refresh_s`` seconds in the background, so choosing a host for a call never touches the DHT.
This module does not call experts (see :mod:`swarmtrain.expert_pool.client`).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import TYPE_CHECKING, Iterable, Optional

from hivemind.utils import get_dht_time

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.keys import RecordKind
from swarmtrain.dht.records import ExpertLoad, ExpertsRecord
from swarmtrain.dht.uids import parse_uid

if TYPE_CHECKING:
    from swarmtrain.expert_pool.server import ExpertServer

logger = logging.getLogger(__name__)

_View = dict[str, list[tuple[str, ExpertLoad, float]]]  # uid -> [(host peer id, load, expiration time)]


def choose_experts_to_host(all_uids: list[str], served: dict[str, int], max_experts: int, peer_id: str) -> list[str]:
    """The experts this peer should host: least-served first, spread over the (modality, layer) groups.

    Among equally served experts, each group's first pick comes before any group's second, so a peer with room
    for fewer experts than exist still covers every MoE layer of every modality (a lone peer hosting 8 of 16
    experts could otherwise miss a whole layer and never train). Ties are broken by a hash of ``(peer_id, uid)``,
    so peers that start together (and all see the same counts) pick different experts instead of all piling
    onto the first ones.
    """
    if max_experts < 0:
        raise ValueError(f"max_experts must be >= 0, got {max_experts}")
    key = {uid: (served.get(uid, 0), _tie_break(peer_id, uid)) for uid in dict.fromkeys(all_uids)}
    groups: dict[tuple, list[str]] = {}
    for uid in key:
        try:
            parsed = parse_uid(uid)
            group: tuple = (parsed.modality, parsed.layer)
        except ValueError:
            group = (uid,)
        groups.setdefault(group, []).append(uid)
    rank_in_group = {}
    for members in groups.values():
        for rank, uid in enumerate(sorted(members, key=key.__getitem__)):
            rank_in_group[uid] = rank
    ranked = sorted(key, key=lambda uid: (key[uid][0], rank_in_group[uid], key[uid][1]))
    return ranked[:max_experts]


def coverage_gaps(all_uids: list[str], hosted: Iterable[str], served: dict[str, int], per_group: int,
                  capacity: int, peer_id: str) -> list[str]:
    """Replicas this peer should add so that it hosts ``per_group`` experts of every (modality, layer) group of
    ``all_uids`` (the experts of its modalities), at most ``capacity`` of them, least-served first.

    With ``per_group = top_k`` every layer can run from this peer's own experts: communication-aware routing
    then keeps most calls in-process (a home uplink carries averaging, not activations), and a peer cut off
    from the swarm keeps training on them. Groups with the fewest hosted experts are filled first.
    """
    hosted = set(hosted)
    groups: dict[tuple, list[str]] = {}
    for uid in dict.fromkeys(all_uids):
        parsed = parse_uid(uid)
        groups.setdefault((parsed.modality, parsed.layer), []).append(uid)
    wanted: list[tuple[int, int, str]] = []  # (rank within its group's gap, hosted in group, uid)
    for members in groups.values():
        have = sum(uid in hosted for uid in members)
        candidates = [uid for uid in members if uid not in hosted]
        picks = choose_experts_to_host(candidates, served, max(0, per_group - have), peer_id)
        wanted += [(rank, have, uid) for rank, uid in enumerate(picks)]
    return [uid for _, _, uid in sorted(wanted)][:max(0, capacity)]


class ExpertRegistry:
    """This peer's view of who hosts which expert: publishes our ExpertsRecord, keeps a TTL-cached view of all.

    :param directory: the run's directory (typed DHT reads and writes)
    :param server: this peer's expert server, or None for a peer that hosts nothing
    :param ttl_s: lifetime of our published record (republish well before it expires)
    :param refresh_s: period of the background refresh started by :meth:`start`

    Example::

        registry = ExpertRegistry(directory, server, ttl_s=30)
        registry.start()                     # publish + refresh every refresh_s in a daemon thread
        registry.hosts("text.0.3")           # [(peer id, ExpertLoad), ...], least loaded first
        registry.stop()
    """

    def __init__(
        self, directory: SwarmDirectory, server: Optional[ExpertServer], ttl_s: float, refresh_s: float = 2.0
    ):
        if ttl_s <= 0 or refresh_s <= 0:
            raise ValueError(f"ttl_s and refresh_s must be positive, got {ttl_s} and {refresh_s}")
        self.directory, self.server = directory, server
        self.ttl_s, self.refresh_s = float(ttl_s), float(refresh_s)
        self._view: _View = {}
        self.last_refresh: Optional[float] = None  # DHT time of the last successful refresh
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def publish(self) -> bool:
        """Store our ExpertsRecord (from ``server.hosted()``) for ``ttl_s``; False without a server or on failure."""
        if self.server is None:
            return False
        record = ExpertsRecord(peer_id=self.directory.peer_id, experts=self.server.hosted(), time=get_dht_time())
        return self.directory.publish(RecordKind.EXPERTS, record, self.ttl_s)

    def refresh(self) -> None:
        """Re-read every peer's ExpertsRecord from the DHT into the local view (blocking; not for the hot path)."""
        view: _View = {}
        for peer_id, (record, expiration) in self.directory.read(RecordKind.EXPERTS).items():
            for uid, load in record.experts.items():
                view.setdefault(uid, []).append((peer_id, load, expiration))
        self._view = view  # swapped atomically: readers see the old or the new view, never a mix
        self.last_refresh = get_dht_time()

    def hosts(self, uid: str) -> list[tuple[str, ExpertLoad]]:
        """Live hosts of ``uid`` (record not expired), least loaded first."""
        now = get_dht_time()
        live = [(peer, load) for peer, load, expiration in self._view.get(uid, ()) if expiration >= now]
        me = self.directory.peer_id
        return sorted(live, key=lambda item: (item[1].load, _tie_break(me, item[0])))

    def served_counts(self, uids: Iterable[str]) -> dict[str, int]:
        """Number of live hosts of each uid."""
        return {uid: len(self.hosts(uid)) for uid in uids}

    def start(self) -> None:
        """Publish and refresh every ``refresh_s`` in a daemon thread (republishing at least every ttl_s / 3)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="expert-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (the last record expires by itself after ttl_s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        publish_every = min(self.refresh_s, self.ttl_s / 3)
        next_publish = 0.0
        while not self._stop.is_set():
            try:
                if self.server is not None and get_dht_time() >= next_publish:
                    if not self.publish():
                        logger.warning("could not publish this peer's experts record to the DHT")
                    next_publish = get_dht_time() + publish_every
                self.refresh()
            except Exception as e:  # keep the last view; the DHT may be briefly unreachable
                logger.warning(f"expert registry update failed: {type(e).__name__}: {e}")
            self._stop.wait(min(self.refresh_s, publish_every))


def _tie_break(peer_id: str, uid: str) -> bytes:
    return hashlib.sha256(f"{peer_id}/{uid}".encode()).digest()
