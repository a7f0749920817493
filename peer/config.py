"""The options of every role (coordinator, peer, demo, status, dashboard), one dataclass each.

Every option is a flag, a key of the ``--config`` TOML file and an environment variable ``SWARMTRAIN_<NAME>``
(see :mod:`swarmtrain.peer.options`). The coordinator's ``[manifest]`` TOML table holds the run manifest
(model sizes, modalities, experts per layer, optimizer, averaging, dataset): see ``examples/run.toml``.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Optional

from pydantic import ValidationError

from swarmtrain.dht.keys import validate_run_id
from swarmtrain.dht.node import DEFAULT_HOST_MADDRS, parse_maddrs
from swarmtrain.dht.records import MODALITIES, Manifest
from swarmtrain.peer.options import OptionsError, option

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,64}$")


@dataclass
class NetworkOptions:
    run_id: str = option("demo", "run id shared by the coordinator and its volunteers")
    identity: Optional[str] = option(None, "key file fixing this node's peer id across restarts (created if absent)")
    host_maddrs: list = option(list(DEFAULT_HOST_MADDRS), "multiaddrs to listen on (default: all interfaces, any port)")
    announce_maddrs: list = option([], "multiaddrs to announce to others instead of the detected ones (e.g. behind port forwarding)")
    use_relay: bool = option(True, "allow connecting through libp2p circuit relays")
    use_auto_relay: bool = option(False, "look for relays and accept connections through them (for peers behind NAT)")
    log_level: str = option("INFO", "logging level", choices=LOG_LEVELS)

    def check_network(self) -> None:
        try:
            validate_run_id(self.run_id)
            parse_maddrs(self.host_maddrs, what="--host-maddrs")
            parse_maddrs(self.announce_maddrs, what="--announce-maddrs")
            parse_maddrs(getattr(self, "initial_peers", []), what="--initial-peers", need_peer_id=True)
            coordinator = getattr(self, "coordinator", None)
            if coordinator is not None and not PEER_ID_RE.match(coordinator):
                raise ValueError(f"bad --coordinator {coordinator!r}: expected a base58 peer id (Qm... or 12D3KooW...)")
        except ValueError as e:
            raise OptionsError(str(e)) from None


@dataclass
class CoordinatorOptions(NetworkOptions):
    """swarmtrain coordinator: stable bootstrap node, signed manifest, checkpoints."""

    manifest: dict = option({}, "the run manifest (a [manifest] table in the --config TOML file)", hidden=True)
    initial_peers: list = option([], "other swarm nodes to join (a coordinator normally starts the swarm alone)")
    checkpoint_dir: str = option("checkpoints", "where checkpoints (safetensors) are written")
    checkpoint_every_s: float = option(60.0, "seconds between checkpoints of the swarm's model (0: never)")
    keep_checkpoints: int = option(3, "how many recent checkpoints to keep")
    resume: Optional[str] = option(
        None, "resume the run from this checkpoint file, or 'latest' (the newest in --checkpoint-dir)")
    maddrs_file: Optional[str] = option(None, "also write the multiaddrs volunteers should use to this file")
    dashboard_port: int = option(0, "also serve the dashboard on this port (0: no dashboard)")
    dashboard_host: str = option("127.0.0.1", "address the dashboard binds to")

    def check(self) -> None:
        self.check_network()
        build_manifest(self.manifest, self.run_id, "Qm" + "1" * 44)
        if self.checkpoint_every_s < 0 or self.keep_checkpoints < 1:
            raise OptionsError("--checkpoint-every-s must be >= 0 and --keep-checkpoints >= 1")


@dataclass
class PeerOptions(NetworkOptions):
    """swarmtrain peer: a volunteer that hosts experts, trains on its data shard and averages with others."""

    initial_peers: list = option([], "multiaddrs of the coordinator (or any peer of the swarm), ending in /p2p/<peer id>")
    coordinator: Optional[str] = option(None, "peer id whose manifest is trusted (default: the first initial peer's)")
    modalities: list = option([], "modalities to train and host experts for (default: all of the run's)")
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:N")
    public_name: str = option("", "name shown on the dashboard (max 64 characters)")
    max_experts: int = option(8, "most experts this peer hosts")
    max_upload_mbps: float = option(
        0.0, "your uplink in Mbit/s: expert calls first, then averaging, are paced to stay under it, which keeps your "
             "router's queue empty (0: no pacing; set it on home links, e.g. 20)")
    data: Optional[str] = option(None, "folder with your own data (text files, images in class folders, WAV files)")
    data_shard: str = option("auto", "which shard of the data to train on: INDEX/COUNT, or auto (from the peer id)")
    batch_size: int = option(0, "samples per step (0: the manifest's)")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    client_mode: bool = option(False, "do not accept incoming connections (behind NAT without port forwarding)")
    max_steps: int = option(0, "stop after this many training steps (0: run until stopped)")
    progress_file: Optional[str] = option(
        None, "append one JSON line per training step to this file (time, steps, samples, losses, averaging "
              "rounds, expert calls and bytes): for monitoring scripts and benchmarks")
    manifest_timeout_s: float = option(60.0, "how long to wait for the coordinator's manifest")
    bootstrap_attempts: int = option(6, "tries to reach the initial peers (exponential backoff, at most 10 s apart)")

    def check(self) -> None:
        self.check_network()
        if not self.initial_peers:
            raise OptionsError("--initial-peers is required: the multiaddr printed by the coordinator")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise OptionsError(f"unknown modality {bad[0]!r} in --modalities (choose from {', '.join(MODALITIES)})")
        if len(self.public_name) > 64:
            raise OptionsError("--public-name is longer than 64 characters")
        if self.max_experts < 0 or self.batch_size < 0 or self.threads < 0 or self.max_steps < 0:
            raise OptionsError("--max-experts, --batch-size, --threads and --max-steps must be >= 0")
        if not (self.max_upload_mbps == 0 or 0.1 <= self.max_upload_mbps <= 100_000):
            raise OptionsError("--max-upload-mbps must be 0 (no limit) or between 0.1 and 100000 Mbit/s")
        if self.manifest_timeout_s <= 0 or self.bootstrap_attempts < 1:
            raise OptionsError("--manifest-timeout-s must be > 0 and --bootstrap-attempts >= 1")
        if self.data is not None and not os.path.isdir(self.data):
            raise OptionsError(f"--data {self.data!r} is not a folder")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise OptionsError(f"bad --device {self.device!r}: use auto, cpu, cuda or cuda:N")
        parse_shard(self.data_shard)


@dataclass
class DemoOptions:
    """swarmtrain demo: a coordinator and N volunteer peers as separate processes on 127.0.0.1."""

    peers: int = option(3, "number of volunteer peer processes")
    duration: float = option(120.0, "seconds of training before the demo stops (0: until Ctrl+C)")
    json: bool = option(False, "print one JSON object with the measured results as the last line")
    run_id: str = option("demo", "run id of the demo swarm")
    dashboard_port: int = option(0, "serve the dashboard on 127.0.0.1:PORT while the demo runs (0: no dashboard)")
    max_experts: int = option(0, "most experts per peer (0: enough for every expert to be hosted)")
    workdir: Optional[str] = option(None, "folder for keys, logs and checkpoints (default: a temporary folder)")
    threads: int = option(1, "torch threads per peer")
    coordinator_config: Optional[str] = option(None, "run.toml for the demo's coordinator (default: the built-in manifest)")

    def check(self) -> None:
        if not 1 <= self.peers <= 32:
            raise OptionsError("--peers must be between 1 and 32")
        if self.duration < 0 or self.dashboard_port < 0 or self.threads < 1:
            raise OptionsError("--duration and --dashboard-port must be >= 0, --threads >= 1")


@dataclass
class StatusOptions:
    """swarmtrain status: join as a reader and print the swarm's manifest, peers and experts."""

    initial_peers: list = option([], "multiaddrs of the coordinator or any peer, ending in /p2p/<peer id>")
    coordinator: Optional[str] = option(None, "peer id whose manifest is trusted (default: the first initial peer's)")
    run_id: str = option("demo", "run id")
    json: bool = option(False, "print JSON instead of a table")
    host_maddrs: list = option(list(DEFAULT_HOST_MADDRS), "multiaddrs to listen on")
    announce_maddrs: list = option([], "multiaddrs to announce (unused by a client-mode reader)", hidden=True)
    log_level: str = option("WARNING", "logging level", choices=LOG_LEVELS)

    def check(self) -> None:
        NetworkOptions.check_network(self)
        if not self.initial_peers:
            raise OptionsError("--initial-peers is required")


@dataclass
class DashboardOptions(StatusOptions):
    """swarmtrain dashboard: a read-only web page with the swarm's health."""

    host: str = option("127.0.0.1", "address to bind the web server to")
    port: int = option(8080, "port of the web server")
    db: str = option("swarmtrain-dashboard.sqlite", "SQLite file keeping the history of the charts")
    retention_s: float = option(7 * 86400.0, "how long to keep history")


def build_manifest(table: dict, run_id: str, coordinator_peer_id: str) -> Manifest:
    """Validate the ``[manifest]`` table of a run.toml into a Manifest (raises OptionsError naming the field)."""
    fields = dict(table)
    for reserved in ("run_id", "coordinator", "created_at", "format_version", "resumed_from"):
        if reserved in fields:
            raise OptionsError(f"[manifest] must not set {reserved!r}: it is filled in by the coordinator")
    try:
        return Manifest(run_id=run_id, coordinator=coordinator_peer_id, created_at=time.time(), **fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise OptionsError(f"bad [manifest] in the config: {where}: {first['msg']}") from None
    except TypeError as e:
        raise OptionsError(f"bad [manifest] in the config: {e}") from None


def parse_shard(text: str) -> Optional[tuple[int, int]]:
    """``"i/n"`` -> (i, n); ``"auto"`` -> None; anything else raises OptionsError."""
    if text == "auto":
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
        if not 0 <= index < count:
            raise ValueError
        return index, count
    except ValueError:
        raise OptionsError(f"bad --data-shard {text!r}: use INDEX/COUNT with 0 <= INDEX < COUNT, or auto") from None
