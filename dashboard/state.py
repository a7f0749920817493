"""The shape of ``GET /api/v1/state``: pure functions from what the collector knows to plain JSON-able dicts.

Every field is documented in ``dashboard/API.md``; keep the two in step (``STATE_SCHEMA`` names the version).
Nothing here reads the DHT or keeps state between polls.
"""
from __future__ import annotations

from typing import Iterable, Optional

from swarmtrain.dht.records import AveragingRecord, ExpertsRecord, Manifest, short_peer_id
from swarmtrain.dht.uids import parse_uid
from swarmtrain.dashboard.tracking import PeerBook, PeerState, PeerTrack

STATE_SCHEMA = "swarmtrain.dashboard.state/1"
DEFAULT_HEARTBEAT_PERIOD_S = 2.0  # TrainingSpec's default, used until a manifest is seen


class Reachability:
    """How other peers can reach a peer, judged from what it announces."""

    DIRECT = "direct"  # listens on public multiaddrs
    RELAY = "relay"  # reachable only through a circuit relay (/p2p-circuit multiaddr)
    CLIENT = "client"  # client mode: makes outgoing connections only, not reachable
    UNKNOWN = "unknown"  # announced no address


def reachability(maddrs: Iterable[str], client_mode: bool) -> str:
    """Classify a peer: any ``/p2p-circuit`` address means relay; client mode without one means unreachable."""
    maddrs = list(maddrs)
    if any("/p2p-circuit" in m for m in maddrs):
        return Reachability.RELAY
    if client_mode:
        return Reachability.CLIENT
    return Reachability.DIRECT if maddrs else Reachability.UNKNOWN


def stale_after_s(manifest: Optional[Manifest]) -> float:
    """A heartbeat older than twice the run's heartbeat period marks its peer stale."""
    period = manifest.training.heartbeat_period_s if manifest is not None else DEFAULT_HEARTBEAT_PERIOD_S
    return 2.0 * period


def peer_view(track: PeerTrack, now: float, stale_s: float, experts: Optional[ExpertsRecord],
              averaging: Optional[AveragingRecord]) -> dict:
    """One row of the peers table."""
    hb = track.heartbeat
    state = track.state(now, stale_s)
    return {
        "peer_id": track.peer_id,
        "short_id": short_peer_id(track.peer_id),
        "public_name": hb.public_name,
        "role": hb.role,
        "state": state.value,
        "heartbeat_time": hb.time,
        "heartbeat_age_s": track.heartbeat_age(now),
        "expires_in_s": max(0.0, track.expires_at - now) if state != PeerState.GONE else 0.0,
        "first_seen_at": track.first_seen,
        "last_seen_at": track.last_seen,
        "gone_since": track.gone_since,
        "maddrs": list(hb.maddrs),
        "client_mode": hb.client_mode,
        "reachability": reachability(hb.maddrs, hb.client_mode),
        "device": hb.device,
        "version": hb.version,
        "modalities": list(hb.modalities),
        "experts": list(hb.experts),
        "experts_served": sorted(experts.experts) if experts is not None and state != PeerState.GONE else [],
        "samples_per_s": hb.samples_per_s,
        "loss": hb.loss,
        "val_loss": hb.val_loss,
        "val_loss_initial": hb.val_loss_initial,
        "losses": dict(hb.losses),
        "steps": hb.steps,
        "samples": track.total("samples"),
        "averaging_rounds": track.total("averaging_rounds"),
        "averaging_failures": hb.averaging_failures,
        "averaging_bytes": track.total("averaging_bytes"),
        "averaging_groups": len(averaging.groups) if averaging is not None and state != PeerState.GONE else 0,
        "since_last_averaging_s": now - track.last_round_at,
        "uptime_s": max(0.0, now - hb.started_at) if hb.started_at > 0 else None,
    }


def experts_view(manifest: Optional[Manifest], records: dict[str, ExpertsRecord]) -> dict[str, list[dict]]:
    """Per modality, every expert with its live replicas (peers whose expert record lists it) and summed load.

    The manifest's expert list is the reference; uids a peer serves that the manifest lacks are listed too,
    with ``in_manifest: false``. An expert with no replica is ``under_served``.
    """
    hosts: dict[str, list[tuple[str, object]]] = {}
    for peer_id, record in records.items():
        for uid, load in record.experts.items():
            hosts.setdefault(uid, []).append((peer_id, load))
    expected = manifest.expert_uids() if manifest is not None else []
    uids = list(expected) + sorted(set(hosts) - set(expected), key=parse_uid)
    expected_set = set(expected)
    result: dict[str, list[dict]] = {}
    if manifest is not None:
        for modality in manifest.modalities:
            result[modality] = []
    for uid in uids:
        uid_parts = parse_uid(uid)
        replicas = hosts.get(uid, [])
        result.setdefault(uid_parts.modality, []).append({
            "uid": uid,
            "layer": uid_parts.layer,
            "index": uid_parts.index,
            "replicas": len(replicas),
            "hosts": sorted(peer_id for peer_id, _ in replicas),
            "load": sum(load.load for _, load in replicas),
            "calls": sum(load.calls for _, load in replicas),
            "version": max((load.version for _, load in replicas), default=None),
            "in_manifest": uid in expected_set,
            "under_served": not replicas,
        })
    return result


def manifest_view(manifest: Optional[Manifest], live: bool, now: float) -> Optional[dict]:
    """The verified manifest, whole, plus a few derived numbers for the overview."""
    if manifest is None:
        return None
    return {
        **manifest.model_dump(mode="json"),
        "resumed_from": manifest.resumed_from,  # null when the run was not resumed (the dump leaves it out)
        "live": live,
        "num_experts": len(manifest.expert_uids()),
        "run_uptime_s": max(0.0, now - manifest.created_at),
    }


def overview_view(peers: list[dict], experts: dict[str, list[dict]], book: PeerBook,
                  averaging: dict[str, AveragingRecord], rates: dict[str, Optional[float]],
                  recent_gone_s: float, now: float) -> dict:
    """Swarm-wide numbers. Rates and losses use online nodes only; totals include peers seen earlier.

    Peer counts are of volunteers (role ``peer``); ``nodes_online`` also counts the coordinator and observers.
    """
    online = [p for p in peers if p["state"] == PeerState.ONLINE.value]
    val_losses = [p["val_loss"] for p in online if p["val_loss"] is not None]
    losses = [p["loss"] for p in online if p["loss"] is not None]
    volunteers = [p for p in peers if p["role"] == "peer"]
    trainers = [p for p in online if p["role"] == "peer"]
    totals = book.totals()
    all_experts = [e for modality in experts.values() for e in modality]
    return {
        "peers_online": len(trainers),
        "peers_stale": sum(p["state"] == PeerState.STALE.value for p in volunteers),
        "peers_gone_recently": sum(
            p["state"] == PeerState.GONE.value and now - (p["gone_since"] or now) <= recent_gone_s for p in volunteers
        ),
        "peers_known": len(volunteers),
        "nodes_online": len(online),
        "samples_per_s": sum(p["samples_per_s"] for p in online),
        "loss": _mean(losses),
        "val_loss": _mean(val_losses),
        "samples_total": totals["samples"],
        "averaging_rounds_total": totals["averaging_rounds"],
        "averaging_bytes_total": totals["averaging_bytes"],
        "averaging_rounds_per_min": rates.get("averaging_rounds_per_min"),
        "averaging_bytes_per_s": rates.get("averaging_bytes_per_s"),
        "averaging_staleness_s": max((p["since_last_averaging_s"] for p in trainers), default=None),
        "peers_ready_to_average": len(averaging),
        "experts_total": len(all_experts),
        "experts_under_served": sum(e["under_served"] for e in all_experts),
    }


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None
