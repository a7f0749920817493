"""Reading a running swarm from outside: a client-mode DHT node that only reads records (status, demo)."""
from __future__ import annotations

import time
from typing import Optional, Sequence

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.node import DEFAULT_HOST_MADDRS, SwarmNode
from swarmtrain.dht.records import short_peer_id


class SwarmObserver:
    """Joins the swarm in client mode (accepts no connections, serves nothing) and snapshots its records."""

    def __init__(self, run_id: str, initial_peers: Sequence[str], host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS,
                 coordinator: Optional[str] = None):
        self.identity = Identity.load_or_create(None)
        try:
            self.node = SwarmNode(run_id, self.identity, initial_peers=initial_peers, trusted_coordinator=coordinator,
                                  client_mode=True, start_p2p=False, host_maddrs=host_maddrs)
        except BaseException:
            self.identity.discard()
            raise
        self.directory = SwarmDirectory(self.node.dht, run_id, self.identity.peer_id)

    def snapshot(self) -> dict:
        """Manifest, heartbeats and expert registry as plain JSON-able data."""
        manifest = self.directory.manifest()
        experts: dict[str, list[str]] = {}
        for peer, record in self.directory.experts().items():
            for uid in record.experts:
                experts.setdefault(uid, []).append(peer)
        return {
            "time": time.time(),
            "manifest": manifest.model_dump(mode="json") if manifest else None,
            "peers": {peer: hb.model_dump(mode="json") for peer, hb in self.directory.heartbeats().items()},
            "experts": experts,
        }

    def close(self) -> None:
        self.node.shutdown()
        self.identity.discard()


def read_status(options) -> dict:
    observer = SwarmObserver(options.run_id, options.initial_peers, options.host_maddrs, options.coordinator)
    try:
        snapshot = observer.snapshot()
        if snapshot["manifest"] is None:  # records may take a moment to reach a fresh node
            time.sleep(2)
            snapshot = observer.snapshot()
        return snapshot
    finally:
        observer.close()


def render_status(status: dict) -> str:
    lines = []
    manifest = status["manifest"]
    if manifest is None:
        lines.append("no verified manifest visible (wrong --run-id, or the coordinator is down)")
    else:
        lines.append(f"run {manifest['run_id']!r}: modalities {', '.join(manifest['modalities'])}, "
                     f"experts per layer {manifest['experts_per_layer']}, coordinator {manifest['coordinator']}")
        if manifest.get("resumed_from") is not None:
            try:
                saved = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(manifest["resumed_from"]))
            except (OverflowError, OSError, ValueError):
                saved = f"at {manifest['resumed_from']!r}"
            lines.append(f"resumed from a checkpoint saved {saved}")
    lines.append(f"{'name':<20} {'peer':<10} {'role':<12} {'steps':>7} {'samples/s':>10} {'loss':>8} {'val':>8}  experts")
    for peer, hb in sorted(status["peers"].items(), key=lambda kv: kv[1]["public_name"]):
        loss = f"{hb['loss']:.3f}" if hb["loss"] is not None else "-"
        val = f"{hb['val_loss']:.3f}" if hb["val_loss"] is not None else "-"
        lines.append(f"{hb['public_name'][:20]:<20} {short_peer_id(peer):<10} {hb['role']:<12} {hb['steps']:>7} "
                     f"{hb['samples_per_s']:>10.1f} {loss:>8} {val:>8}  {len(hb['experts'])}")
    if manifest is not None:
        total = 0
        unserved = []
        from swarmtrain.dht.records import Manifest

        for uid in Manifest.model_validate(manifest).expert_uids():
            total += 1
            if not status["experts"].get(uid):
                unserved.append(uid)
        lines.append(f"experts served: {total - len(unserved)}/{total}"
                     + (f" (unserved: {', '.join(unserved)})" if unserved else ""))
    return "\n".join(lines)
