"""Time series of a swarm's health in SQLite, so the dashboard's curves survive a page reload and a restart.

The collector appends one row per poll for the swarm as a whole and one per live peer; the HTTP server reads
them back, averaged into at most ``max_points`` time buckets per series. The file stays bounded: rows older than
``retention_s`` are deleted and, past ``max_rows`` rows in all, the oldest go first. Several runs can share one
file (every row carries its run id).

This module only stores numbers the collector already computed; it knows nothing of the DHT.
"""
from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Optional

#: columns of the swarm series, in storage order (all REAL, NULL when unknown)
SWARM_FIELDS: tuple[str, ...] = (
    "peers_online",
    "samples_per_s",
    "loss",
    "val_loss",
    "samples_total",
    "averaging_rounds_per_min",
    "averaging_bytes_per_s",
    "averaging_staleness_s",
)
#: columns of the per-peer series
PEER_FIELDS: tuple[str, ...] = ("loss", "val_loss", "samples_per_s")

_PRUNE_EVERY = 30  # prune after this many appends (and once on open)


@dataclass(frozen=True)
class PeerPoint:
    """One peer's values at one poll."""

    peer_id: str
    public_name: str
    values: dict[str, Optional[float]]


class HistoryStore:
    """Append-only, size-bounded time series of one run in a SQLite file (``":memory:"`` keeps them in RAM).

    :param path: SQLite file; created with its tables if missing
    :param run_id: the run whose rows this store writes and reads
    :param retention_s: rows older than this are deleted
    :param max_rows: upper bound on swarm + peer rows of all runs in the file; the oldest are deleted first

    Example::

        store = HistoryStore("dash.sqlite", "demo")
        store.append(time.time(), {"loss": 2.5, "peers_online": 3}, [PeerPoint(pid, "alice", {"loss": 2.4})])
        store.query(window_s=3600, max_points=300)["swarm"]["loss"]
    """

    def __init__(self, path: str, run_id: str, *, retention_s: float = 7 * 86400, max_rows: int = 200_000):
        if retention_s <= 0 or max_rows < 2:
            raise ValueError(f"retention_s must be > 0 and max_rows >= 2, got {retention_s}, {max_rows}")
        if path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise ValueError(f"cannot create the dashboard history {path!r}: {directory!r} does not exist")
        self.path = path
        self.run_id = run_id
        self.retention_s = float(retention_s)
        self.max_rows = int(max_rows)
        self._lock = threading.Lock()
        self._appends = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        self._create_tables()
        self.prune()

    def append(self, t: float, swarm: dict[str, Optional[float]], peers: list[PeerPoint]) -> None:
        """Store the swarm's values and each peer's values at time ``t`` (unix seconds)."""
        swarm_row = [self.run_id, float(t)] + [_num(swarm.get(name)) for name in SWARM_FIELDS]
        peer_rows = [
            [self.run_id, float(t), p.peer_id] + [_num(p.values.get(name)) for name in PEER_FIELDS] for p in peers
        ]
        names = [(self.run_id, p.peer_id, p.public_name, float(t)) for p in peers]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(f"INSERT INTO swarm VALUES ({','.join('?' * len(swarm_row))})", swarm_row)
                if peer_rows:
                    self._db.executemany(
                        f"INSERT INTO peer VALUES ({','.join('?' * len(peer_rows[0]))})", peer_rows
                    )
                    self._db.executemany(
                        "INSERT INTO peer_name VALUES (?,?,?,?) ON CONFLICT(run_id, peer_id) DO UPDATE SET "
                        "public_name=excluded.public_name, last_seen=excluded.last_seen",
                        names,
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._appends += 1
            due = self._appends % _PRUNE_EVERY == 0
        if due:
            self.prune()

    def query(self, window_s: float = 3600.0, max_points: int = 300, max_peers: int = 32,
              now: Optional[float] = None) -> dict:
        """Series of the last ``window_s`` seconds, averaged into at most ``max_points`` buckets each.

        Returns ``{"swarm": {"t": [...], <field>: [...]}, "peers": [{"peer_id", "public_name", "t", <field>...}]}``
        with peers ordered by most recently seen (at most ``max_peers``); missing values are ``None``.
        """
        now = time.time() if now is None else now
        window_s = max(1.0, min(float(window_s), self.retention_s))
        max_points = max(2, min(int(max_points), 5000))
        since = now - window_s
        bucket = window_s / max_points
        swarm_cols = ", ".join(f"AVG({name})" for name in SWARM_FIELDS)
        peer_cols = ", ".join(f"AVG({name})" for name in PEER_FIELDS)
        with self._lock:
            swarm_rows = self._db.execute(
                f"SELECT AVG(t), {swarm_cols} FROM swarm WHERE run_id=? AND t>=? "
                f"GROUP BY CAST((t - ?) / ? AS INTEGER) ORDER BY 1",
                (self.run_id, since, since, bucket),
            ).fetchall()
            recent = self._db.execute(
                "SELECT peer_id, public_name FROM peer_name WHERE run_id=? AND last_seen>=? "
                "ORDER BY last_seen DESC LIMIT ?",
                (self.run_id, since, max(0, int(max_peers))),
            ).fetchall()
            peer_rows = {}
            for peer_id, _ in recent:
                peer_rows[peer_id] = self._db.execute(
                    f"SELECT AVG(t), {peer_cols} FROM peer WHERE run_id=? AND peer_id=? AND t>=? "
                    f"GROUP BY CAST((t - ?) / ? AS INTEGER) ORDER BY 1",
                    (self.run_id, peer_id, since, since, bucket),
                ).fetchall()
        swarm = _columns(("t",) + SWARM_FIELDS, swarm_rows)
        peers = [
            {"peer_id": peer_id, "public_name": name, **_columns(("t",) + PEER_FIELDS, peer_rows[peer_id])}
            for peer_id, name in recent
        ]
        return {"window_s": window_s, "bucket_s": bucket, "swarm": swarm, "peers": peers}

    def row_count(self) -> int:
        """Swarm + peer rows of all runs in the file."""
        with self._lock:
            return sum(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("swarm", "peer"))

    def prune(self, now: Optional[float] = None) -> int:
        """Delete rows past the retention, then the oldest rows past ``max_rows``; return how many went."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        deleted = 0
        with self._lock:
            for table in ("swarm", "peer"):
                deleted += self._db.execute(f"DELETE FROM {table} WHERE t < ?", (cutoff,)).rowcount
            self._db.execute("DELETE FROM peer_name WHERE last_seen < ?", (cutoff,))
            counts = {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("swarm", "peer")}
            excess = counts["swarm"] + counts["peer"] - self.max_rows
            if excess > 0:
                # keep the two tables' shares: delete from each in proportion to its size
                for table, count in counts.items():
                    share = math.ceil(excess * count / (counts["swarm"] + counts["peer"]))
                    if share:
                        deleted += self._db.execute(
                            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} ORDER BY t LIMIT ?)",
                            (share,),
                        ).rowcount
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _create_tables(self) -> None:
        swarm_cols = ", ".join(f"{name} REAL" for name in SWARM_FIELDS)
        peer_cols = ", ".join(f"{name} REAL" for name in PEER_FIELDS)
        with self._lock:
            self._db.executescript(
                f"""
                CREATE TABLE IF NOT EXISTS swarm (run_id TEXT NOT NULL, t REAL NOT NULL, {swarm_cols});
                CREATE INDEX IF NOT EXISTS swarm_run_t ON swarm (run_id, t);
                CREATE INDEX IF NOT EXISTS swarm_t ON swarm (t);
                CREATE TABLE IF NOT EXISTS peer (run_id TEXT NOT NULL, t REAL NOT NULL, peer_id TEXT NOT NULL,
                                                 {peer_cols});
                CREATE INDEX IF NOT EXISTS peer_run_peer_t ON peer (run_id, peer_id, t);
                CREATE INDEX IF NOT EXISTS peer_t ON peer (t);
                CREATE TABLE IF NOT EXISTS peer_name (run_id TEXT NOT NULL, peer_id TEXT NOT NULL,
                                                      public_name TEXT NOT NULL, last_seen REAL NOT NULL,
                                                      PRIMARY KEY (run_id, peer_id));
                """
            )


def _num(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _columns(names: tuple[str, ...], rows: list[tuple]) -> dict[str, list]:
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}
