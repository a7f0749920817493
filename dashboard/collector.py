"""The dashboard's collector: a thread that reads the swarm's records from the DHT every few seconds.

Each poll reads the manifest, heartbeats, expert records and averaging records through
:class:`~swarmtrain.dht.directory.SwarmDirectory` (so only records that passed the node's signature and schema
checks are seen), updates the :class:`~swarmtrain.dashboard.tracking.PeerBook`, builds the state served at
``/api/v1/state`` and appends a row to the SQLite history. It only reads: it never publishes a record.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Optional

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.keys import RecordKind
from swarmtrain.dht.records import Manifest
from swarmtrain.dashboard.history import HistoryStore, PeerPoint
from swarmtrain.dashboard.neighbours import reconnect, routing_table_size
from swarmtrain.dashboard.state import (
    STATE_SCHEMA,
    experts_view,
    manifest_view,
    overview_view,
    peer_view,
    stale_after_s,
)
from swarmtrain.dashboard.tracking import PeerBook, PeerState

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0  # rates (rounds per minute, bytes per second) are averaged over this window


class IsolatedError(RuntimeError):
    """The dashboard's DHT node lost every neighbour and could not reach any known peer again."""


class SwarmCollector:
    """Polls one run's records and keeps the latest dashboard state.

    :param directory: a reader of the run's records (its node validates them)
    :param run_id: the run shown
    :param history: where time series go (None: keep none)
    :param poll_s: seconds between polls
    :param recent_gone_s: peers gone for less than this count as "recently gone" in the overview
    :param gone_keep_s: gone peers stay in the peers table this long
    :param clock: unix time source (tests may pass their own)

    Example::

        collector = SwarmCollector(SwarmDirectory(node.dht, "demo", node.peer_id), "demo")
        collector.poll_once()
        print(collector.state()["overview"]["peers_online"])
    """

    def __init__(self, directory: SwarmDirectory, run_id: str, *, history: Optional[HistoryStore] = None,
                 poll_s: float = 2.0, recent_gone_s: float = 600.0, gone_keep_s: float = 3600.0,
                 clock: Callable[[], float] = time.time):
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.directory = directory
        self.run_id = run_id
        self.history = history
        self.poll_s = float(poll_s)
        self.recent_gone_s = float(recent_gone_s)
        self.clock = clock
        self.book = PeerBook(gone_keep_s=gone_keep_s)
        self.started_at = clock()
        self.polls = 0
        self.last_poll_at: Optional[float] = None
        self.last_poll_duration_s: Optional[float] = None
        self.last_error: Optional[str] = None
        self.dht_neighbours: Optional[int] = None
        self.reconnects = 0
        self._manifest: Optional[Manifest] = None
        self._rate_points: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._state: dict = self._build({}, {}, False, self.started_at)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Poll in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("the collector is already started")
        self._thread = threading.Thread(target=self._run, name="swarmtrain-dashboard-collector", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the dashboard collector did not stop in time (a DHT read is still running)")

    def state(self) -> dict:
        """The latest state (see dashboard/API.md); a fresh dict the caller may serialize."""
        with self._lock:
            state = self._state
        return state

    def poll_once(self) -> dict:
        """Read every record kind once, update the state and the history; return the new state.

        A failed DHT read raises; the thread loop records it in ``dashboard.last_error`` and keeps the last good
        state, so a network hiccup never shows every peer as gone.
        """
        started = time.monotonic()
        self._ensure_neighbours()
        manifest, heartbeats, experts, averaging = self._read()
        if not heartbeats and any(t.gone_since is None for t in self.book.peers.values()):
            # everyone vanished at once: more likely this node lost its neighbours during the reads
            if self._ensure_neighbours():
                manifest, heartbeats, experts, averaging = self._read()
        now = self.clock()
        if manifest is not None:
            self._manifest = manifest
        self.book.update(heartbeats, now)
        self.polls += 1
        self.last_poll_at = now
        self.last_poll_duration_s = time.monotonic() - started
        self.last_error = None
        state = self._build(experts, averaging, manifest is not None, now)
        with self._lock:
            self._state = state
        if self.history is not None:
            self._record(state, now)
        return state

    def _read(self) -> tuple:
        manifest = self.directory.manifest()
        heartbeats = self.directory.read(RecordKind.PEERS)
        experts = {peer: rec for peer, (rec, _) in self.directory.read(RecordKind.EXPERTS).items()}
        averaging = {peer: rec for peer, (rec, _) in self.directory.read(RecordKind.AVERAGING).items()}
        return manifest, heartbeats, experts, averaging

    def _ensure_neighbours(self) -> bool:
        """If the DHT node has no neighbour left, ping the peers known so far; True if it had to reconnect.

        Raises :class:`IsolatedError` when none of them answers, so the poll fails loudly instead of showing
        every peer as gone.
        """
        self.dht_neighbours = routing_table_size(self.directory.dht)
        if self.dht_neighbours > 0:
            return False
        known = {pid for pid, t in self.book.peers.items() if t.gone_since is None and not t.heartbeat.client_mode}
        if self._manifest is not None:
            known.add(self._manifest.coordinator)
        known.discard(self.directory.peer_id)
        self.dht_neighbours = reconnect(self.directory.dht, known)
        if self.dht_neighbours == 0:
            raise IsolatedError(
                f"the dashboard's DHT node has no neighbours left and none of the {len(known)} known peers answered"
            )
        logger.info(f"the dashboard's DHT node lost its neighbours; reconnected to {self.dht_neighbours}")
        self.reconnects += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                logger.warning(f"dashboard poll failed: {self.last_error}")
                with self._lock:
                    self._state = {**self._state, "dashboard": self._dashboard_info(self.clock())}
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - started)))

    def _build(self, experts: dict, averaging: dict, manifest_live: bool, now: float) -> dict:
        manifest = self._manifest
        stale_s = stale_after_s(manifest)
        peers = [
            peer_view(track, now, stale_s, experts.get(peer_id), averaging.get(peer_id))
            for peer_id, track in self.book.peers.items()
        ]
        order = {PeerState.ONLINE.value: 0, PeerState.STALE.value: 1, PeerState.GONE.value: 2}
        peers.sort(key=lambda p: (order[p["state"]], p["public_name"] or "~", p["peer_id"]))
        expert_rows = experts_view(manifest, experts)
        return {
            "schema": STATE_SCHEMA,
            "run_id": self.run_id,
            "generated_at": now,
            "dashboard": self._dashboard_info(now),
            "stale_after_s": stale_s,
            "manifest": manifest_view(manifest, manifest_live, now),
            "overview": overview_view(peers, expert_rows, self.book, averaging, self._rates(now), self.recent_gone_s, now),
            "peers": peers,
            "experts": expert_rows,
        }

    def _dashboard_info(self, now: float) -> dict:
        return {
            "started_at": self.started_at,
            "uptime_s": now - self.started_at,
            "poll_s": self.poll_s,
            "polls": self.polls,
            "last_poll_at": self.last_poll_at,
            "last_poll_duration_s": self.last_poll_duration_s,
            "last_error": self.last_error,
            "dht_neighbours": self.dht_neighbours,
            "reconnects": self.reconnects,
        }

    def _rates(self, now: float) -> dict[str, Optional[float]]:
        """Rounds per minute and bytes per second over the last minute, from counter increments seen here."""
        observed = self.book.observed
        points = self._rate_points
        points.append((now, observed["averaging_rounds"], observed["averaging_bytes"]))
        while len(points) > 2 and points[1][0] <= now - RATE_WINDOW_S:
            points.popleft()
        t0, rounds0, bytes0 = points[0]
        if now - t0 <= 0:
            return {"averaging_rounds_per_min": None, "averaging_bytes_per_s": None}
        return {
            "averaging_rounds_per_min": (observed["averaging_rounds"] - rounds0) * 60.0 / (now - t0),
            "averaging_bytes_per_s": (observed["averaging_bytes"] - bytes0) / (now - t0),
        }

    def _record(self, state: dict, now: float) -> None:
        overview = state["overview"]
        swarm = {name: overview.get(name) for name in (
            "peers_online", "samples_per_s", "loss", "val_loss", "samples_total", "averaging_rounds_per_min",
            "averaging_bytes_per_s", "averaging_staleness_s",
        )}
        peers = [
            PeerPoint(p["peer_id"], p["public_name"], {k: p[k] for k in ("loss", "val_loss", "samples_per_s")})
            for p in state["peers"]
            if p["state"] != PeerState.GONE.value
        ]
        self.history.append(now, swarm, peers)
