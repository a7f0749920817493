"""The coordinator: seeds a run. Stable bootstrap node, signed manifest, periodic checkpoints.

It does not train. It keeps a DHT node with a persistent identity (``--identity``) so volunteers can always
bootstrap from the same multiaddr, re-publishes the signed manifest well before it expires, publishes its own
heartbeat (role ``coordinator``), and every ``--checkpoint-every-s`` pulls the current replicated parameters from a
live peer and every expert from one of its hosts into a safetensors checkpoint. With ``--resume`` it continues the
run of a checkpoint and serves that checkpoint's state to the first volunteers (:mod:`~swarmtrain.peer.seed`).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from swarmtrain.averaging.gossip import GossipAverager
from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.keys import RecordKind
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import Heartbeat, Manifest
from swarmtrain.expert_pool.client import fetch_expert_state
from swarmtrain.expert_pool.dispatch import LocalDispatcher
from swarmtrain.expert_pool.registry import ExpertRegistry
from swarmtrain.peer.checkpoint import Checkpoint, CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from swarmtrain.peer.config import CoordinatorOptions, build_manifest
from swarmtrain.peer.daemon import swarmtrain_version
from swarmtrain.peer.model import SwarmModel
from swarmtrain.peer.seed import CheckpointSeed

logger = logging.getLogger(__name__)

MANIFEST_TTL_S = 60.0
MANIFEST_REPUBLISH_S = 10.0


class Coordinator:
    """Runs the coordinator role until ``stop`` is set.

    :param options: validated :class:`~swarmtrain.peer.config.CoordinatorOptions`
    :param announce: called once with the multiaddrs volunteers should use (the CLI prints them)
    """

    def __init__(self, options: CoordinatorOptions):
        self.options = options
        self.node: Optional[SwarmNode] = None
        self.dashboard = None
        self.started_at = time.time()
        self.checkpoints_saved = 0

    def start(self) -> list[str]:
        opts = self.options
        self.identity = identity = Identity.load_or_create(opts.identity)
        checkpoint = self._resume_checkpoint() if opts.resume else None
        if checkpoint is None:
            self.manifest: Manifest = build_manifest(opts.manifest, opts.run_id, identity.peer_id)
        else:
            self.manifest = checkpoint.manifest
        self.node = SwarmNode(
            opts.run_id, identity, initial_peers=opts.initial_peers, trusted_coordinator=identity.peer_id,
            host_maddrs=opts.host_maddrs, announce_maddrs=opts.announce_maddrs,
            use_relay=opts.use_relay, use_auto_relay=opts.use_auto_relay,
        )
        self.peer_id = identity.peer_id
        self.directory = SwarmDirectory(self.node.dht, opts.run_id, identity.peer_id)
        self.maddrs = self.node.visible_maddrs()
        self.seed = CheckpointSeed(checkpoint)
        self.node.loop.run(self.seed.add_handler(self.node.p2p), timeout=30)
        self._publish()
        if opts.maddrs_file:
            with open(opts.maddrs_file, "w") as f:
                f.write("\n".join(self.maddrs) + "\n")
        if opts.dashboard_port:
            from swarmtrain.dashboard.server import DashboardServer

            self.dashboard = DashboardServer(
                self.directory, opts.run_id, host=opts.dashboard_host, port=opts.dashboard_port
            )
            self.dashboard.start()
            logger.info(f"dashboard at {self.dashboard.url}")
        return self.maddrs

    def _resume_checkpoint(self) -> Checkpoint:
        """The checkpoint named by ``--resume`` (a file, or ``latest`` in ``--checkpoint-dir``), checked against
        ``--run-id``, with its manifest made this run's: a ``[manifest]`` table is applied over the checkpoint's
        manifest (it may change training settings such as the learning rate, not the model, modalities, experts or
        seed); the run keeps its creation time and is marked ``resumed_from`` the checkpoint's save time."""
        opts = self.options
        path = opts.resume
        if path == "latest":
            found = list_checkpoints(opts.checkpoint_dir)
            if not found:
                raise CheckpointError(f"--resume latest: no checkpoint in {opts.checkpoint_dir!r}")
            path = found[-1]
        checkpoint = load_checkpoint(path)
        saved = checkpoint.manifest
        if saved.run_id != opts.run_id:
            raise CheckpointError(
                f"checkpoint {path!r} is of run {saved.run_id!r}, not {opts.run_id!r}: pass --run-id {saved.run_id}"
            )
        fields = saved.model_dump(mode="json", exclude={"run_id", "coordinator", "created_at", "format_version",
                                                         "resumed_from"})
        manifest = build_manifest(_merged(fields, opts.manifest), opts.run_id, self.identity.peer_id)
        changed = [name for name in ("model", "modalities", "experts_per_layer", "seed")
                   if getattr(manifest, name) != getattr(saved, name)]
        if changed:
            raise CheckpointError(f"the [manifest] table changes {', '.join(changed)} of the checkpoint's run "
                                  f"({path!r}); a resumed run may change training settings only")
        # validated again as a whole (model_copy would skip validation)
        checkpoint.manifest = Manifest.model_validate(
            {**manifest.model_dump(), "created_at": saved.created_at, "resumed_from": checkpoint.saved_at}
        )
        logger.info(f"resuming run {saved.run_id!r} from checkpoint {path} (saved at {checkpoint.saved_at:.0f}, "
                    f"{len(checkpoint.experts)} experts)")
        return checkpoint

    def run(self, stop: threading.Event) -> None:
        last_checkpoint = last_manifest = time.monotonic()
        checkpointer: Optional[threading.Thread] = None
        while not stop.wait(self.manifest.training.heartbeat_period_s):
            now = time.monotonic()
            try:
                self._publish(manifest=now - last_manifest >= MANIFEST_REPUBLISH_S)
            except Exception as e:  # keep the bootstrap node up; the next tick retries
                logger.warning(f"could not publish the manifest/heartbeat: {e}")
            if now - last_manifest >= MANIFEST_REPUBLISH_S:
                last_manifest = now
            every = self.options.checkpoint_every_s
            busy = checkpointer is not None and checkpointer.is_alive()
            if every and now - last_checkpoint >= every and not busy:  # in the background: heartbeats go on
                last_checkpoint = now
                checkpointer = threading.Thread(target=self._checkpoint_logged, name="checkpoint", daemon=True)
                checkpointer.start()
        if checkpointer is not None:
            checkpointer.join(timeout=30)

    def _checkpoint_logged(self) -> None:
        try:
            path = self.checkpoint()
            if path:
                logger.info(f"saved checkpoint {path}")
        except Exception as e:
            logger.warning(f"checkpoint failed: {e}")

    def _publish(self, manifest: bool = True) -> None:
        """Re-sign and store the manifest (if asked) and the coordinator's heartbeat."""
        if manifest and not self.directory.publish(RecordKind.MANIFEST, self.manifest, MANIFEST_TTL_S):
            logger.warning("could not store the manifest in the DHT (will retry)")
        heartbeat = Heartbeat(
            peer_id=self.peer_id, role="coordinator", public_name="coordinator", version=swarmtrain_version(),
            maddrs=tuple(self.maddrs[:16]), started_at=self.started_at, time=time.time(),
        )
        self.directory.publish(RecordKind.PEERS, heartbeat, self.manifest.training.heartbeat_ttl_s)

    def checkpoint(self) -> Optional[str]:
        """Pull the swarm's current model from live peers and save it; None if no peer is training yet."""
        model = SwarmModel(self.manifest, LocalDispatcher({}))
        names = [name for name, _ in model.named_parameters()]
        params = [p.data for p in model.parameters()]
        puller = GossipAverager(
            self.node, self.directory, params, threading.Lock(), self.manifest.averaging, group="replicated"
        )
        try:
            if not puller.load_state_from_peers():
                logger.info("no live peer to checkpoint from yet")
                return None
        finally:
            puller.shutdown()
        registry = ExpertRegistry(self.directory, None, ttl_s=self.manifest.training.heartbeat_ttl_s)
        registry.refresh()
        experts, missing = {}, []
        for uid in self.manifest.expert_uids():
            for host, _load in registry.hosts(uid):
                try:
                    experts[uid] = self.node.loop.run(fetch_expert_state(self.node.p2p, host, uid), timeout=30)
                    break
                except Exception as e:
                    logger.debug(f"could not fetch {uid} from {host}: {e}")
            else:
                missing.append(uid)
        resumed = self.seed.checkpoint
        if resumed is not None:  # a resumed run: experts nobody hosts yet keep the state we resumed from
            kept = [uid for uid in missing if uid in resumed.experts]
            experts.update({uid: resumed.experts[uid] for uid in kept})
            missing = [uid for uid in missing if uid not in resumed.experts]
        if missing:
            logger.warning(f"checkpoint without unreachable experts: {', '.join(missing)}")
        checkpoint = Checkpoint(
            self.manifest, dict(zip(names, params)), experts, time.time(), sorted(self.directory.heartbeats())
        )
        self.checkpoints_saved += 1
        return save_checkpoint(self.options.checkpoint_dir, checkpoint, self.options.keep_checkpoints)

    def shutdown(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None
        if self.node is not None:
            self.node.shutdown()
            self.node = None
        if getattr(self, "identity", None) is not None:
            self.identity.discard()  # only a throwaway key; --identity files are kept


def _merged(base: dict, table: dict) -> dict:
    """``base`` with ``table``'s keys applied; sections (dicts in both) are merged key by key, one level deep."""
    merged = dict(base)
    for key, value in table.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
