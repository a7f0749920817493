"""DHT directory: uid scheme, schemas, identities/signatures and the record validator on real DHT nodes."""
from __future__ import annotations

import time

import pytest
from hivemind.p2p import PeerID
from pydantic import ValidationError

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity, IdentityError, verify_signature
from swarmtrain.dht.keys import RecordKind, dht_key, validate_run_id
from swarmtrain.dht.node import BootstrapError, SwarmNode, parse_maddrs
from swarmtrain.dht.records import Heartbeat, Manifest, ModelSpec
from swarmtrain.dht.uids import make_uid, parse_uid

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_uid_scheme_round_trips_and_rejects_garbage():
    assert make_uid("text", 1, 3) == "text.1.3"
    assert parse_uid("image.0.7") == ("image", 0, 7)
    for bad in ["text.1", "video.0.1", "text.a.1", "", "text.1.2.3", None]:
        with pytest.raises(ValueError, match="malformed expert uid"):
            parse_uid(bad)


def test_keys_are_namespaced_by_run_and_validated():
    assert dht_key("run-1", RecordKind.PEERS) == "swarmtrain:run-1:peers"
    with pytest.raises(ValueError, match="invalid run id"):
        validate_run_id("bad run id!")


def test_manifest_schema_checks_consistency():
    m = Manifest(run_id="r", created_at=1.0, coordinator="Qm" + "a" * 44)
    assert len(m.expert_uids()) == 2 * 2 * 4 and m.expert_uids(("text",))[0] == "text.0.0"
    with pytest.raises(ValidationError, match="divisible"):
        ModelSpec(hidden=65, heads=4)
    with pytest.raises(ValidationError, match="experts_per_layer"):
        Manifest(run_id="r", created_at=1.0, coordinator="Qm" + "a" * 44, modalities=("audio",))
    with pytest.raises(ValidationError):
        Heartbeat(peer_id="Qm" + "a" * 44, public_name="x" * 65)
    with pytest.raises(ValidationError):
        Heartbeat(peer_id="Qm" + "a" * 44, loss=float("nan"))


def test_identity_matches_libp2p_peer_id_and_survives_reload(tmp_path):
    path = str(tmp_path / "peer.key")
    first = Identity.load_or_create(path)
    again = Identity.load_or_create(path)
    assert first.peer_id == again.peer_id
    with open(path, "rb") as f:
        assert PeerID.from_identity(f.read()).to_base58() == first.peer_id
    signature = first.sign(b"payload")
    assert verify_signature(first.public_key, b"payload", signature)
    assert not verify_signature(first.public_key, b"tampered", signature)
    assert not verify_signature(b"garbage", b"payload", signature)
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="cannot read identity key file"):
        Identity.load(str(corrupt))


def test_bad_multiaddrs_get_errors_naming_them():
    with pytest.raises(ValueError, match="'/ip4/999.1.1.1/tcp/1'"):
        parse_maddrs(["/ip4/999.1.1.1/tcp/1"], what="--initial-peers")
    with pytest.raises(ValueError, match="must end with /p2p/"):
        parse_maddrs(["/ip4/127.0.0.1/tcp/1"], what="--initial-peers", need_peer_id=True)


@pytest.mark.timeout(60)
def test_unreachable_initial_peer_retries_then_fails_clearly():
    ghost = Identity.load_or_create(None)
    started = time.monotonic()
    with pytest.raises(BootstrapError, match="could not reach any initial peer"):
        SwarmNode("r", Identity.load_or_create(None), initial_peers=[f"/ip4/127.0.0.1/tcp/9/p2p/{ghost.peer_id}"],
                  host_maddrs=LOOPBACK, bootstrap_attempts=2, bootstrap_backoff_s=0.5, start_p2p=False)
    assert time.monotonic() - started >= 0.5  # it waited (backoff) before giving up
    ghost.discard()


@pytest.mark.timeout(90)
def test_validator_accepts_signed_records_and_rejects_forgeries():
    coordinator_id = Identity.load_or_create(None)
    coordinator = SwarmNode("r", coordinator_id, host_maddrs=LOOPBACK, start_p2p=False)
    peer_id = Identity.load_or_create(None)
    peer = SwarmNode("r", peer_id, initial_peers=coordinator.visible_maddrs(), host_maddrs=LOOPBACK, start_p2p=False)
    try:
        cdir = SwarmDirectory(coordinator.dht, "r", coordinator_id.peer_id)
        pdir = SwarmDirectory(peer.dht, "r", peer_id.peer_id)
        manifest = Manifest(run_id="r", created_at=time.time(), coordinator=coordinator_id.peer_id)
        assert cdir.publish(RecordKind.MANIFEST, manifest, 30)
        assert pdir.manifest() == manifest  # verified against the pinned coordinator

        assert pdir.publish(RecordKind.PEERS, Heartbeat(peer_id=peer_id.peer_id, public_name="p"), 30)
        assert cdir.heartbeats()[peer_id.peer_id].public_name == "p"

        # a peer signing a manifest of its own: rejected everywhere (not the pinned coordinator)
        rogue = Manifest(run_id="r", created_at=time.time() + 1, coordinator=peer_id.peer_id)
        assert not pdir.publish(RecordKind.MANIFEST, rogue, 30)
        assert cdir.manifest().coordinator == coordinator_id.peer_id

        # a heartbeat claiming to be someone else: subkey/owner mismatch, rejected
        forged = Heartbeat(peer_id=coordinator_id.peer_id, public_name="forged")
        assert not pdir.publish(RecordKind.PEERS, forged, 30)
        assert coordinator_id.peer_id not in cdir.heartbeats()

        # an unsigned raw value under a swarm key (written around the directory): rejected
        raw = peer.dht.store(dht_key("r", RecordKind.PEERS), {"peer_id": peer_id.peer_id}, time.time() + 30,
                             subkey="someone-else")
        assert not raw
    finally:
        peer.shutdown()
        coordinator.shutdown()
        coordinator_id.discard()
        peer_id.discard()


def test_records_claiming_a_far_future_expiration_are_rejected():
    import dataclasses

    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import get_dht_time
    from hivemind.utils.serializer import MSGPackSerializer

    from swarmtrain.dht.validator import SwarmRecordValidator

    owner = Identity.load_or_create(None)
    try:
        validator = SwarmRecordValidator("r", owner)
        value = MSGPackSerializer.dumps(Heartbeat(peer_id=owner.peer_id).model_dump(mode="json"))
        record = DHTRecord(DHTID.generate(source=dht_key("r", RecordKind.PEERS)).to_bytes(),
                           MSGPackSerializer.dumps(owner.peer_id), value, get_dht_time() + 30)
        assert validator.validate(dataclasses.replace(record, value=validator.sign_value(record)))
        forever = dataclasses.replace(record, expiration_time=get_dht_time() + 10 * 365 * 86400)
        assert not validator.validate(dataclasses.replace(forever, value=validator.sign_value(forever)))
        # a signature made for one expiration does not cover another (no replay with a longer life)
        replay = dataclasses.replace(record, value=validator.sign_value(record), expiration_time=record.expiration_time + 60)
        assert not validator.validate(replay)
    finally:
        owner.discard()
