"""Signing and validation of the swarm's DHT records (a hivemind ``RecordValidatorBase``).

Every record under a swarm key (:mod:`swarmtrain.dht.keys`) must be:

* stored under a subkey that is a peer id, and signed by the key whose hash is that peer id (so only a peer can
  write its own heartbeat, expert list or rendezvous entry, and nobody can forge the coordinator's manifest);
* signed over (key, subkey, payload, expiration time), so a record cannot be replayed with a later expiration;
* a payload that passes its schema in :mod:`swarmtrain.dht.records`, whose ``peer_id`` / ``coordinator`` field
  names the same peer as the subkey;
* for the manifest, written by the pinned coordinator when this node knows which one it trusts.

A record that fails any check is dropped (never stored, never returned) and the reason is logged. Records under
other keys are left to other validators.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import msgpack
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from swarmtrain.dht.identity import Identity, peer_id_from_public_key, verify_signature
from swarmtrain.dht.keys import RecordKind, all_keys
from swarmtrain.dht.records import parse_record

logger = logging.getLogger(__name__)

_REJECT_LOG_INTERVAL_S = 5.0
MAX_RECORD_TTL_S = 3600.0  # no swarm record may claim to live longer than this (heartbeats use seconds)
MAX_PUBLIC_KEY_BYTES = 1024  # a 4096-bit RSA key in a libp2p PublicKey is ~550 bytes


class SwarmRecordValidator(RecordValidatorBase):
    """Signs this node's swarm records and rejects any swarm record that is unsigned, forged or malformed.

    :param run_id: the run whose keys this validator guards
    :param identity: this node's identity; records it stores under its own peer id are signed with it
    :param trusted_coordinator: peer id whose manifest is accepted (None: any correctly self-signed manifest)
    """

    def __init__(self, run_id: str, identity: Optional[Identity], trusted_coordinator: Optional[str] = None):
        self.run_id = run_id
        self.identity = identity
        self.trusted_coordinator = trusted_coordinator
        self._kinds = {DHTID.generate(source=key).to_bytes(): kind for key, kind in all_keys(run_id).items()}
        self._own_subkey = MSGPackSerializer.dumps(identity.peer_id) if identity is not None else None
        self._last_reject_log = 0.0
        self.rejected = 0

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True  # not a swarm record: other validators decide
        reason = self._check(kind, record)
        if reason is None:
            return True
        self.rejected += 1
        now = time.monotonic()
        if kind == RecordKind.MANIFEST or now - self._last_reject_log > _REJECT_LOG_INTERVAL_S:
            self._last_reject_log = now
            logger.warning(f"rejected a {kind.value} record from the DHT: {reason}")
        return False

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._kinds.get(record.key) is None or self.identity is None or record.subkey != self._own_subkey:
            return record.value
        signature = self.identity.sign(_signed_bytes(record, record.value))
        return msgpack.packb({"v": record.value, "k": self.identity.public_key, "s": signature}, use_bin_type=True)

    def strip_value(self, record: DHTRecord) -> bytes:
        if self._kinds.get(record.key) is None:
            return record.value
        return _unpack_envelope(record.value)["v"]

    @property
    def priority(self) -> int:
        return 20  # sign last / check first, like hivemind's RSASignatureValidator (10)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False

    def _check(self, kind: RecordKind, record: DHTRecord) -> Optional[str]:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return "swarm records must be stored under a peer id subkey"
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            envelope = _unpack_envelope(record.value)
        except Exception as e:
            return f"undecodable record ({type(e).__name__}: {e})"
        if not isinstance(subkey, str):
            return f"subkey {subkey!r} is not a peer id"
        if record.expiration_time > get_dht_time() + MAX_RECORD_TTL_S:
            return f"record of {subkey} expires more than {MAX_RECORD_TTL_S:.0f}s in the future"
        if len(envelope["k"]) > MAX_PUBLIC_KEY_BYTES:
            return f"record of {subkey} carries an oversized public key"
        signer = peer_id_from_public_key(envelope["k"])
        if signer != subkey:
            return f"signed by {signer} but stored under {subkey}"
        if not verify_signature(envelope["k"], _signed_bytes(record, envelope["v"]), envelope["s"]):
            return f"bad signature on the record of {subkey}"
        try:
            payload = parse_record(kind, MSGPackSerializer.loads(envelope["v"]))
        except Exception as e:
            return f"record of {subkey} fails its schema: {_first_line(e)}"
        owner = payload.coordinator if kind == RecordKind.MANIFEST else payload.peer_id
        if owner != subkey:
            return f"record names owner {owner} but is signed by {subkey}"
        if kind == RecordKind.MANIFEST:
            if payload.run_id != self.run_id:
                return f"manifest is for run {payload.run_id!r}, not {self.run_id!r}"
            if self.trusted_coordinator is not None and subkey != self.trusted_coordinator:
                return f"manifest signed by {subkey}, but the trusted coordinator is {self.trusted_coordinator}"
        return None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["identity"] = self.identity.path if self.identity is not None else None
        return state

    def __setstate__(self, state):
        path = state["identity"]
        state["identity"] = Identity.load(path) if path is not None else None
        self.__dict__.update(state)


def _signed_bytes(record: DHTRecord, payload: bytes) -> bytes:
    return msgpack.packb([record.key, record.subkey, payload, float(record.expiration_time)], use_bin_type=True)


def _unpack_envelope(value: bytes) -> dict:
    envelope = msgpack.unpackb(value, raw=False)
    if not isinstance(envelope, dict) or set(envelope) != {"v", "k", "s"}:
        raise ValueError("not a signed swarm envelope")
    if not all(isinstance(envelope[field], bytes) for field in ("v", "k", "s")):
        raise ValueError("envelope fields must be bytes")
    return envelope


def _first_line(error: Exception) -> str:
    text = str(error).replace("\n", " ")
    return text[:300]
