"""The volunteer peer: joins the swarm, verifies the manifest, hosts experts, trains, averages, reports.

One :class:`PeerDaemon` per process. It assembles the parts (each owned by its own package) and runs the
training loop in the calling thread; a maintenance thread publishes the signed heartbeat and expert registry
entry every ``training.heartbeat_period_s`` and takes over experts of its modalities that nobody serves.

Flow of data: this module -> expert_pool (serve / call experts), averaging (replicated parameters) -> dht.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional

import torch

from swarmtrain.averaging.gossip import GossipAverager
from swarmtrain.averaging.rendezvous import Rendezvous
from swarmtrain.dht.budget import UploadBudget
from swarmtrain.dht.uplink import UplinkMonitor
from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.keys import RecordKind
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import Heartbeat, Manifest, short_peer_id
from swarmtrain.expert_pool.client import ExpertCallError, RemoteDispatcher, fetch_expert_state
from swarmtrain.expert_pool.registry import ExpertRegistry, choose_experts_to_host, coverage_gaps
from swarmtrain.expert_pool.backend import check_state
from swarmtrain.expert_pool.expert import ExpertFFN, make_expert
from swarmtrain.expert_pool.server import ExpertServer
from swarmtrain.peer.config import PeerOptions, parse_shard
from swarmtrain.peer.data import DataSource
from swarmtrain.peer.model import SwarmModel
from swarmtrain.peer.seed import REPLICATED
from swarmtrain.peer.trainer import Trainer, build_optimizer

logger = logging.getLogger(__name__)


class ManifestError(RuntimeError):
    """No verified manifest could be obtained, or it does not fit this peer's options."""


def swarmtrain_version() -> str:
    try:
        return version("swarmtrain")
    except PackageNotFoundError:  # running from a source tree without install
        return "dev"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no CUDA device")
    return device


def wait_for_manifest(directory: SwarmDirectory, timeout_s: float, coordinator: str,
                      stop: Optional[threading.Event] = None) -> Manifest:
    """Poll the DHT until the coordinator's signed manifest is visible (it was verified on arrival)."""
    deadline = time.monotonic() + timeout_s
    stop = stop or threading.Event()
    while not stop.is_set():
        manifest = directory.manifest()
        if manifest is not None:
            logger.info(
                f"manifest of run {manifest.run_id!r} verified: signed by coordinator {manifest.coordinator}"
            )
            return manifest
        if time.monotonic() > deadline:
            raise ManifestError(
                f"no manifest signed by coordinator {coordinator} for run {directory.run_id!r} within "
                f"{timeout_s:.0f}s (wrong --run-id, or a manifest with a bad signature was rejected: see log above)"
            )
        stop.wait(1.0)
    raise ManifestError("stopped while waiting for the manifest")


class PeerDaemon:
    """A volunteer peer process. ``run(stop)`` blocks until ``stop`` is set or ``max_steps`` is reached.

    :param options: validated :class:`~swarmtrain.peer.config.PeerOptions`
    """

    def __init__(self, options: PeerOptions):
        self.options = options
        self.node: Optional[SwarmNode] = None
        self.identity: Optional[Identity] = None
        self.server: Optional[ExpertServer] = None
        self.averager: Optional[GossipAverager] = None
        self.dispatcher: Optional[RemoteDispatcher] = None
        self.expert_averagers: dict[str, GossipAverager] = {}
        self.trainer: Optional[Trainer] = None
        self._maintenance: Optional[threading.Thread] = None
        self._heartbeat: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.budget = UploadBudget(None)
        self.uplink: Optional[UplinkMonitor] = None
        self._seed_unreachable = False  # the coordinator of a resumed run failed to answer a checkpoint request
        self.started_at = time.time()

    def run(self, stop: threading.Event) -> None:
        try:
            self._start(stop)
            if not stop.is_set():
                self._train(stop)
        finally:
            self.shutdown()

    def _start(self, stop: threading.Event) -> None:
        opts = self.options
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = pick_device(opts.device)
        self.identity = identity = Identity.load_or_create(opts.identity)
        self.node = SwarmNode(
            opts.run_id, identity, initial_peers=opts.initial_peers, trusted_coordinator=opts.coordinator,
            host_maddrs=opts.host_maddrs, announce_maddrs=opts.announce_maddrs, client_mode=opts.client_mode,
            use_relay=opts.use_relay, use_auto_relay=opts.use_auto_relay, bootstrap_attempts=opts.bootstrap_attempts,
        )
        self.peer_id = identity.peer_id
        self.maddrs = self.node.visible_maddrs()
        logger.info(f"peer {self.peer_id} joined the swarm; reachable at {' '.join(self.maddrs)}")
        self.directory = SwarmDirectory(self.node.dht, opts.run_id, self.peer_id)
        self.manifest = manifest = wait_for_manifest(
            self.directory, opts.manifest_timeout_s, self.node.trusted_coordinator, stop
        )
        self.modalities = tuple(opts.modalities) or manifest.modalities
        foreign = [m for m in self.modalities if m not in manifest.modalities]
        if foreign:
            raise ManifestError(f"--modalities {foreign} are not part of run {manifest.run_id!r} ({manifest.modalities})")

        self.data = self._load_data(manifest)
        self.budget = UploadBudget(opts.max_upload_mbps or None)
        if self.budget.limited:
            logger.info(f"pacing uploads to {opts.max_upload_mbps:g} Mbit/s (expert calls first, averaging after)")
            if UplinkMonitor.available():
                self.uplink = UplinkMonitor(self.budget)
                self.uplink.start()
            else:
                logger.warning("iproute2's `ss` is missing: the upload budget cannot see the DHT's traffic and "
                               "keeps a fixed 8% allowance for it")
        self.server = ExpertServer(self.node.p2p, self.node.loop, manifest, budget=self.budget)
        self.server.start()
        ttl = manifest.training.heartbeat_ttl_s
        self.registry = ExpertRegistry(self.directory, self.server, ttl_s=ttl)
        self._host_experts(initial=True)

        self.dispatcher = RemoteDispatcher(
            self.node.p2p, self.node.loop, self.registry, manifest, local_server=self.server, budget=self.budget
        )
        self.model = SwarmModel(manifest, self.dispatcher).to(self.device)
        self.lock = threading.Lock()
        self.rendezvous = Rendezvous(self.directory, ttl_s=ttl)  # one DHT record for all of this peer's groups
        self.averager = GossipAverager(
            self.node, self.directory, [p.data for p in self.model.parameters()], self.lock, manifest.averaging,
            ttl_s=ttl, rendezvous=self.rendezvous, budget=self.budget,
        )
        if self.averager.load_state_from_peers():
            logger.info("copied the current replicated parameters from a live peer")
        elif manifest.resumed_from is not None:
            self._load_from_checkpoint(REPLICATED, self._load_replicated)
        self.averager.start()
        batch_size = opts.batch_size or manifest.training.batch_size
        seed = int.from_bytes(hashlib.sha256(self.peer_id.encode()).digest()[:4], "little")
        self.trainer = Trainer(
            self.model, self.data, build_optimizer(self.model.parameters(), manifest.optimizer), self.lock,
            self.averager, batch_size, seed, self.device,
        )
        self._sync_expert_averagers()
        self._maintenance = threading.Thread(target=self._maintain, name="swarmtrain-maintenance", daemon=True)
        self._maintenance.start()
        self._heartbeat = threading.Thread(target=self._beat, name="swarmtrain-heartbeat", daemon=True)
        self._heartbeat.start()

    def _load_data(self, manifest: Manifest) -> DataSource:
        shard = parse_shard(self.options.data_shard)
        if shard is None:
            count = manifest.dataset.num_shards
            shard = (int(hashlib.sha256(self.peer_id.encode()).hexdigest(), 16) % count, count)
        if self.options.data:
            source = DataSource.from_path(self.options.data, manifest, self.modalities, *shard)
        else:
            source = DataSource.builtin(manifest, self.modalities, *shard)
        logger.info(f"training on shard {shard[0]}/{shard[1]} of {source.describe()}")
        return source

    def _host_experts(self, initial: bool = False) -> None:
        """Decide which experts of our modalities to host, up to --max-experts.

        Coverage first: experts that nobody serves are always taken while there is capacity. On joining, a peer
        also takes replicas of the least-served experts up to its fair share (experts / hosting peers), so that
        the first volunteer does not grab everything; later it only takes over experts that lost all hosts.
        Then, capacity permitting, replicas so that it hosts ``top_k`` experts of each of its (modality, layer)
        groups (``coverage_gaps``): its calls can then stay in-process on a slow uplink.
        """
        self.registry.refresh()
        uids = self.manifest.expert_uids(self.modalities)
        hosted = set(self.server.hosted())
        served = self.registry.served_counts(uids)
        unserved = [uid for uid in uids if uid not in hosted and served.get(uid, 0) == 0]
        if unserved and len(hosted) >= self.options.max_experts:
            hosted -= self._release_replicas(hosted, served, len(unserved))
        capacity = self.options.max_experts - len(hosted)
        if capacity <= 0:
            return
        chosen = choose_experts_to_host(unserved, served, capacity, self.peer_id)
        if initial:
            hosts = {peer for peer, record in self.directory.experts().items() if peer != self.peer_id and record.experts}
            fair_share = -(-len(uids) // (len(hosts) + 1))
            room = min(capacity, fair_share) - len(chosen)
            if room > 0:
                replicas = [uid for uid in uids if uid not in hosted and uid not in chosen]
                chosen += choose_experts_to_host(replicas, served, room, self.peer_id)
        # then enough replicas to run every layer locally (communication-aware routing, training while cut off)
        chosen += coverage_gaps(uids, hosted | set(chosen), served, self.manifest.expert_pool.top_k,
                                capacity - len(chosen), self.peer_id)
        for uid in chosen:  # the state is in place before the expert goes live (our own trainer calls it at once)
            self.server.add_expert(uid, self._starting_expert(uid))
        if chosen:
            logger.info(f"hosting experts {', '.join(chosen)}")
            self.registry.publish()

    def _sync_expert_averagers(self) -> None:
        """One averager per hosted expert keeps its replicas in agreement, among that expert's hosts only."""
        hosted = set(self.server.hosted())
        for uid in sorted(hosted - set(self.expert_averagers)):
            averager = GossipAverager(
                self.node, self.directory, [p.data for p in self.server.module(uid).parameters()],
                self.server.expert_lock(uid), self.manifest.averaging, group=uid,
                ttl_s=self.manifest.training.heartbeat_ttl_s, rendezvous=self.rendezvous, budget=self.budget,
            )
            averager.start()
            self.expert_averagers[uid] = averager
        for uid in sorted(set(self.expert_averagers) - hosted):
            self.expert_averagers.pop(uid).shutdown()

    def _starting_expert(self, uid: str) -> ExpertFFN:
        """A new replica of ``uid``: the state of a live one when there is one, else (in a resumed run) the
        coordinator's checkpoint, else the seeded init."""
        spec = self.manifest.model
        module = make_expert(uid, spec.hidden, spec.expert_ffn, self.manifest.seed)

        def load(state: dict, what: str) -> None:
            check_state(module.state_dict(), state, what)
            module.load_state_dict(state)

        for host, _load in self.registry.hosts(uid):
            if host == self.peer_id:
                continue
            try:
                state = self.node.loop.run(fetch_expert_state(self.node.p2p, host, uid), timeout=30)
                load(state, f"the replica of {uid} at {short_peer_id(host)}")
                logger.info(f"expert {uid}: copied the state of the replica at {short_peer_id(host)}")
                return module
            except Exception as e:
                logger.warning(f"expert {uid}: could not copy the replica at {short_peer_id(host)}: {e}")
        if self.manifest.resumed_from is not None:
            self._load_from_checkpoint(uid, lambda state: load(state, f"the checkpoint's {uid}"))
        return module

    def _load_replicated(self, state: dict) -> None:
        """Replace the replicated parameters with ``state`` (by name) through the averager's replica, which
        also resets what it derived from the old values (the outer optimizer's anchor in diloco mode)."""
        named = list(self.model.named_parameters())
        check_state(dict(named), state, "the checkpoint's replicated parameters")
        self.averager.load_parameters([state[name] for name, _ in named])

    def _load_from_checkpoint(self, uid: str, load: Callable[[dict], None]) -> None:
        """In a resumed run, start ``uid`` (an expert, or REPLICATED) from the coordinator's checkpoint when no live
        peer had it; if that fails, a warning (we then start from the seeded init)."""
        if self._seed_unreachable:
            logger.warning(f"{uid}: starting from the seeded init (the coordinator did not answer before)")
            return
        try:
            load(self.node.loop.run(fetch_expert_state(self.node.p2p, self.manifest.coordinator, uid), timeout=60))
        except Exception as e:
            refused = isinstance(e, ExpertCallError) and e.refused  # it answered: e.g. the checkpoint lacks uid
            self._seed_unreachable = not refused  # do not wait on an unreachable coordinator once per expert
            logger.warning(f"{uid}: could not load the resumed run's checkpoint from the coordinator, starting from "
                           f"the seeded init: {e}")
            return
        logger.info(f"{uid}: started from the checkpoint the coordinator resumed the run from")

    def _release_replicas(self, hosted: set[str], served: dict[str, int], wanted: int) -> set[str]:
        """Stop hosting up to ``wanted`` experts that others also host, to make room for unserved ones.

        Of an expert's hosts only the one with the greatest peer id lets go, so two replicas never drop together.
        """
        released = set()
        for uid in sorted(hosted):
            if len(released) >= wanted:
                break
            hosts = [peer for peer, _ in self.registry.hosts(uid)]
            if served.get(uid, 0) >= 2 and self.peer_id in hosts and self.peer_id == max(hosts):
                self.server.remove_expert(uid)
                released.add(uid)
        if released:
            logger.info(f"released replicas {', '.join(sorted(released))} to host experts nobody serves")
        return released

    def _train(self, stop: threading.Event) -> None:
        opts, training = self.options, self.manifest.training
        while not self._evaluate_initial() and not stop.wait(1.0):
            pass
        self._publish_heartbeat()
        last_eval = last_log = time.monotonic()
        progress = open(opts.progress_file, "a", buffering=1) if opts.progress_file else None
        try:
            while not stop.is_set():
                try:
                    self.trainer.step()
                except RuntimeError as e:  # e.g. fewer than k_min experts live: wait for the swarm, do not crash
                    logger.warning(f"training step failed: {e}")
                    stop.wait(1.0)
                    continue
                stats = self.trainer.stats
                if progress is not None:
                    progress.write(json.dumps(self._progress()) + "\n")
                if opts.max_steps and stats.steps >= opts.max_steps:
                    break
                now = time.monotonic()
                if self.trainer.evaluating:
                    self._evaluate(step=True)
                elif now - last_eval >= training.eval_every_s:
                    self.trainer.begin_evaluation()  # one validation batch after each step from now on
                    last_eval = now
                if now - last_log >= 10:
                    self._log_progress()
                    last_log = now
        finally:
            if progress is not None:
                progress.close()
        self._evaluate()
        self._publish_heartbeat()

    def _progress(self) -> dict:
        """One line of ``--progress-file``: where training stands right after a step."""
        stats, avg, calls = self.trainer.stats, self.averager.stats(), self.dispatcher.stats
        return {
            "t": time.time(), "steps": stats.steps, "samples": stats.samples, "loss": _finite(stats.loss),
            "val_loss": _finite(stats.val_loss), "averaging_rounds": avg.rounds, "averaging_failures": avg.failures,
            "averaging_bytes": avg.bytes_sent + avg.bytes_received,
            "expert_averaging_rounds": sum(a.stats().rounds for a in list(self.expert_averagers.values())),
            "forward_calls": calls.forward_calls, "remote_forward_calls": calls.remote_forward_calls,
            "call_timeouts": calls.timeouts, "expert_bytes": calls.bytes_sent + calls.bytes_received,
        }

    def _log_progress(self) -> None:
        stats, avg, calls = self.trainer.stats, self.averager.stats(), self.dispatcher.stats
        logger.info(
            f"step {stats.steps} loss {_fmt(stats.loss)} val {_fmt(stats.val_loss)} "
            f"{stats.samples_per_s:.1f} samples/s, averaging rounds {avg.rounds} (failed {avg.failures}), "
            f"expert forward calls {calls.forward_calls} ({calls.remote_forward_calls} remote, "
            f"{calls.timeouts} timed out, {calls.slow} late)"
        )

    def _evaluate(self, step: bool = False) -> None:
        """A whole evaluation, or (``step``) the next batch of the one in progress."""
        try:
            if step:
                self.trainer.continue_evaluation()
            else:
                self.trainer.evaluate()
        except RuntimeError as e:  # experts vanished mid-evaluation: keep the previous value
            logger.warning(f"evaluation skipped: {e}")

    def _evaluate_initial(self) -> bool:
        """Validation loss before the first step; False while too few experts are live to run the model."""
        try:
            self.trainer.evaluate()
        except RuntimeError as e:
            logger.info(f"waiting for the swarm before the first evaluation: {e}")
            self._publish_heartbeat()
            return False
        logger.info(f"initial validation loss {self.trainer.stats.val_loss:.4f}")
        return True

    def _maintain(self) -> None:
        """Hosting decisions, every heartbeat period. They can take seconds (copying an expert's state, stopping
        the averagers of released replicas), so the records that say we are alive are not published here."""
        period = self.manifest.training.heartbeat_period_s
        while not self._stop.wait(period):
            try:
                self._host_experts()
                self._sync_expert_averagers()
            except Exception as e:
                logger.warning(f"expert hosting maintenance failed: {e}")

    def _beat(self) -> None:
        """Our heartbeat and expert record, every heartbeat period, whatever the maintenance thread is doing: a
        maintenance round longer than the records' TTL used to let both expire, so the dashboard showed the peer
        as gone and other peers took over its experts."""
        period = self.manifest.training.heartbeat_period_s
        while not self._stop.wait(period):
            try:
                self.registry.publish()
            except Exception as e:
                logger.warning(f"could not publish our expert record: {e}")
            self._publish_heartbeat()

    def heartbeat(self) -> Heartbeat:
        stats, avg = self.trainer.stats, self.averager.stats()
        experts_avg = [a.stats() for a in list(self.expert_averagers.values())]
        return Heartbeat(
            peer_id=self.peer_id, role="peer", public_name=self.options.public_name[:64],
            version=swarmtrain_version(), device=str(self.device), modalities=self.modalities,
            experts=tuple(sorted(self.server.hosted())), maddrs=tuple(self.maddrs[:16]),
            client_mode=self.options.client_mode, loss=_finite(stats.loss), val_loss=_finite(stats.val_loss),
            val_loss_initial=_finite(stats.val_loss_initial),
            losses={k: v for k, v in list(stats.losses.items())[:8] if _finite(v) is not None},
            samples_per_s=stats.samples_per_s, steps=stats.steps, samples=stats.samples,
            averaging_rounds=avg.rounds, averaging_failures=avg.failures,
            averaging_bytes=avg.bytes_sent + avg.bytes_received,
            expert_averaging_rounds=sum(a.rounds for a in experts_avg), started_at=self.started_at, time=time.time(),
        )

    def _publish_heartbeat(self) -> None:
        try:
            self.directory.publish(RecordKind.PEERS, self.heartbeat(), self.manifest.training.heartbeat_ttl_s)
        except Exception as e:  # the DHT may be briefly unreachable; the next beat retries
            logger.warning(f"could not publish the heartbeat: {e}")

    def shutdown(self) -> None:
        """Stop every part; safe to call twice and after a failed start."""
        self._stop.set()
        for thread in (self._maintenance, self._heartbeat):
            if thread is not None:
                thread.join(timeout=10)
        parts = [getattr(self.uplink, "stop", None), getattr(self.dispatcher, "close", None),
                 getattr(self.averager, "shutdown", None)]
        parts += [averager.shutdown for averager in self.expert_averagers.values()]
        parts += [getattr(self.server, "shutdown", None)]
        self.expert_averagers = {}
        for stop_part in parts:
            if stop_part is not None:
                try:
                    stop_part()
                except Exception as e:
                    logger.warning(f"error while stopping {stop_part.__qualname__}: {e}")
        self.dispatcher = self.averager = self.server = None
        if self.node is not None:
            self.node.shutdown()
            self.node = None
        if self.identity is not None:
            self.identity.discard()  # only deletes a throwaway key, never one given with --identity
        logger.info("peer stopped")


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"
