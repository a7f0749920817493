"""Every DHT key the swarm uses, in one place.

A key is ``swarmtrain:<run_id>:<kind>``; records under a key are stored with a subkey that names their owner
(a libp2p peer id), so one ``get`` returns every peer's record of that kind. Only the owner can write its subkey
(see :mod:`swarmtrain.dht.validator`).
"""
from __future__ import annotations

import enum
import re

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RecordKind(str, enum.Enum):
    """The kinds of record stored in the DHT, one key each per run."""

    MANIFEST = "manifest"  # the run manifest, subkey = coordinator peer id, signed by the coordinator
    PEERS = "peers"  # status heartbeats, subkey = peer id, signed by that peer
    EXPERTS = "experts"  # expert registry: which experts a peer hosts and their load, subkey = peer id
    AVERAGING = "averaging"  # averaging rendezvous: peers ready to exchange parameters, subkey = peer id


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a valid run id, else raise ValueError naming it."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return run_id


def dht_key(run_id: str, kind: RecordKind) -> str:
    """The DHT key holding all records of ``kind`` for the run ``run_id``."""
    return f"swarmtrain:{validate_run_id(run_id)}:{RecordKind(kind).value}"


def all_keys(run_id: str) -> dict[str, RecordKind]:
    """Map every key of a run to its record kind."""
    return {dht_key(run_id, kind): kind for kind in RecordKind}
