"""The whole swarm as real processes on 127.0.0.1: a coordinator and two volunteer peers.

One swarm is shared by the tests of this module (it takes a while to start on 2 cores); the tests run in file
order and the last ones kill peers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from swarmtrain.peer.checkpoint import list_checkpoints, load_checkpoint

from conftest import LOOPBACK, group_alive, spawn, stop_group, swarmtrain_cmd, wait_for

pytestmark = pytest.mark.slow
RUN = "itest"


class Swarm:
    def __init__(self, workdir):
        self.workdir = workdir
        self.maddrs_file = workdir / "maddrs"
        self.coordinator = spawn(swarmtrain_cmd(
            "coordinator", "--run-id", RUN, "--host-maddrs", LOOPBACK, "--identity", str(workdir / "coord.key"),
            "--maddrs-file", str(self.maddrs_file), "--checkpoint-dir", str(workdir / "ckpt"),
            "--checkpoint-every-s", "15"), str(workdir / "coordinator.log"))
        wait_for(lambda: self.maddrs_file.exists() and self.maddrs_file.read_text().strip(), 60, what="coordinator")
        self.maddr = self.maddrs_file.read_text().split()[0]
        self.peers = {}

    def start_peer(self, name: str, *extra: str) -> subprocess.Popen:
        self.peers[name] = spawn(swarmtrain_cmd(
            "peer", "--run-id", RUN, "--initial-peers", self.maddr, "--host-maddrs", LOOPBACK,
            "--public-name", name, "--threads", "1", "--identity", str(self.workdir / f"{name}.key"), *extra),
            str(self.workdir / f"{name}.log"))
        return self.peers[name]

    def status(self) -> dict:
        result = subprocess.run(swarmtrain_cmd("status", "--run-id", RUN, "--initial-peers", self.maddr, "--json",
                                               "--host-maddrs", LOOPBACK), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def by_name(self, status: dict) -> dict:
        return {hb["public_name"]: hb for hb in status["peers"].values()}

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    swarm = Swarm(tmp_path_factory.mktemp("swarm"))
    swarm.start_peer("alice", "--max-experts", "8", "--data-shard", "0/2")
    wait_for(lambda: "hosting experts" in swarm.log("alice"), 90, what="alice to choose her experts")
    swarm.start_peer("bob", "--max-experts", "8", "--data-shard", "1/2")
    yield swarm
    for process in swarm.peers.values():
        stop_group(process)
    stop_group(swarm.coordinator)


@pytest.mark.timeout(240)
def test_peers_verify_manifest_host_all_experts_and_train(swarm):
    def ready():
        status = swarm.status()
        peers = swarm.by_name(status)
        if not {"alice", "bob"} <= set(peers):
            return None
        if min(peers["alice"]["steps"], peers["bob"]["steps"]) < 5:
            return None
        return status

    status = wait_for(ready, 180, interval=3, what="both peers training")
    for name in ("alice", "bob"):
        assert "verified: signed by coordinator" in swarm.log(name)
    peers = swarm.by_name(status)
    assert peers["coordinator"]["role"] == "coordinator"
    expected = set(json_uids(status["manifest"]))
    served = {uid for uid, hosts in status["experts"].items() if hosts}
    assert served == expected, f"unserved experts: {expected - served}"
    assert set(peers["alice"]["experts"]).isdisjoint(peers["bob"]["experts"])
    for name in ("alice", "bob"):
        hb = peers[name]
        assert hb["loss"] is not None and hb["val_loss_initial"] is not None and hb["samples_per_s"] > 0
        assert hb["device"] == "cpu" and hb["modalities"] == ["text", "image"]


@pytest.mark.timeout(120)
def test_peer_rejects_a_manifest_not_signed_by_its_trusted_coordinator(swarm):
    from swarmtrain.dht.identity import Identity

    impostor = Identity.load_or_create(None)  # the peer is told to trust this key, which signed no manifest
    result = subprocess.run(swarmtrain_cmd(
        "peer", "--run-id", RUN, "--initial-peers", swarm.maddr, "--host-maddrs", LOOPBACK,
        "--coordinator", impostor.peer_id, "--manifest-timeout-s", "6"), capture_output=True, text=True, timeout=100)
    impostor.discard()
    assert result.returncode == 1
    assert f"no manifest signed by coordinator {impostor.peer_id}" in result.stderr.strip().splitlines()[-1]
    assert "rejected a manifest record from the DHT" in result.stderr
    assert f"the trusted coordinator is {impostor.peer_id}" in result.stderr


@pytest.mark.timeout(180)
def test_averaging_rounds_happen_between_peers(swarm):
    def averaged():
        peers = swarm.by_name(swarm.status())
        return peers if min(peers["alice"]["averaging_rounds"], peers["bob"]["averaging_rounds"]) >= 2 else None

    peers = wait_for(averaged, 120, interval=3, what="averaging rounds on both peers")
    assert peers["alice"]["averaging_bytes"] > 0


@pytest.mark.timeout(120)
def test_an_exchange_with_a_live_peer_pulls_parameters_toward_each_other(swarm):
    """A real averaging exchange between this test process and the peer process alice."""
    import threading

    import torch

    from swarmtrain.averaging.gossip import GossipAverager
    from swarmtrain.dht.directory import SwarmDirectory
    from swarmtrain.dht.identity import Identity
    from swarmtrain.dht.node import SwarmNode
    from swarmtrain.dht.records import Manifest
    from swarmtrain.expert_pool.dispatch import LocalDispatcher
    from swarmtrain.peer.model import SwarmModel

    status = swarm.status()
    alice = [peer for peer, hb in status["peers"].items() if hb["public_name"] == "alice"][0]
    manifest = Manifest.model_validate(status["manifest"])
    identity = Identity.load_or_create(None)
    node = SwarmNode(RUN, identity, initial_peers=[swarm.maddr], host_maddrs=[LOOPBACK])
    try:
        params = [p.data for p in SwarmModel(manifest, LocalDispatcher({})).parameters()]
        averager = GossipAverager(node, SwarmDirectory(node.dht, RUN, identity.peer_id), params, threading.Lock(),
                                  manifest.averaging, seed=0)
        try:
            assert averager.load_state_from_peers()  # start from the swarm's current parameters...
            torch.manual_seed(0)
            deltas = [0.2 * torch.randn_like(p) for p in params]
            for p, delta in zip(params, deltas):
                p.add_(delta)  # ...then step away from them
            before = torch.cat([p.flatten() for p in params]).clone()
            deadline = time.monotonic() + 30
            while (outcome := averager.average_once(alice)) == "busy" and time.monotonic() < deadline:
                time.sleep(0.2)  # alice is in an exchange with bob or carol right now: a legitimate refusal
            assert outcome == "ok", outcome
            after = torch.cat([p.flatten() for p in params])
        finally:
            averager.shutdown()
    finally:
        node.shutdown()
        identity.discard()
    moved, delta = after - before, torch.cat([d.flatten() for d in deltas])
    # one exchange with alice pulls us back toward the swarm (about half way for equal push-sum weights)
    assert 0.3 * delta.norm() < moved.norm() < 1.0 * delta.norm(), (moved.norm(), delta.norm())
    assert torch.nn.functional.cosine_similarity(moved, -delta, dim=0) > 0.8
    assert averager.stats().rounds == 1 and averager.stats().bytes_received > 0


@pytest.mark.timeout(120)
def test_coordinator_saves_a_loadable_checkpoint_of_the_whole_model(swarm):
    checkpoints = wait_for(lambda: list_checkpoints(str(swarm.workdir / "ckpt")), 90, what="a checkpoint")
    checkpoint = load_checkpoint(checkpoints[-1])
    assert checkpoint.manifest.run_id == RUN
    assert set(checkpoint.experts) == set(checkpoint.manifest.expert_uids())
    assert checkpoint.replicated and all(t.isfinite().all() for t in checkpoint.replicated.values())


@pytest.mark.timeout(240)
def test_killed_peer_leaves_no_process_and_its_experts_are_taken_over(swarm):
    swarm.start_peer("carol", "--max-experts", "16", "--data-shard", "0/1")
    wait_for(lambda: swarm.by_name(swarm.status()).get("carol", {}).get("steps", 0) > 0, 120, interval=3,
             what="carol to join")
    # carol took replicas of experts alice and bob host: their replicas average among their hosts only
    wait_for(lambda: swarm.by_name(swarm.status())["carol"]["expert_averaging_rounds"] > 0, 60, interval=3,
             what="averaging among the replicas of an expert")
    bob = swarm.peers.pop("bob")
    bob_experts = set(swarm.by_name(swarm.status())["bob"]["experts"])
    os.killpg(bob.pid, signal.SIGKILL)
    bob.wait()
    wait_for(lambda: not group_alive(bob.pid), 10, what="bob's process group (DHT process, p2pd) to die")

    def taken_over():
        status = swarm.status()
        peers = swarm.by_name(status)
        if "bob" in peers or not {"alice", "carol"} <= set(peers):  # a read can miss a record under load: retry
            return None
        survivors = set(peers["alice"]["experts"]) | set(peers["carol"]["experts"])
        return status if bob_experts <= survivors else None

    status = wait_for(taken_over, 90, interval=3, what="bob's experts to be hosted again")
    assert swarm.by_name(status)["carol"]["steps"] > 0


@pytest.mark.timeout(90)
def test_sigterm_stops_peer_and_coordinator_cleanly(swarm):
    for name in ("alice", "carol"):
        process = swarm.peers.pop(name)
        assert stop_group(process, signal.SIGTERM, timeout=40) == 0
        assert not group_alive(process.pid)
        assert "peer stopped" in swarm.log(name)
    assert stop_group(swarm.coordinator, signal.SIGTERM, timeout=30) == 0
    assert not group_alive(swarm.coordinator.pid)


def json_uids(manifest: dict) -> list[str]:
    return [f"{m}.{layer}.{i}" for m in manifest["modalities"] for layer in range(manifest["model"]["layers"])
            for i in range(manifest["experts_per_layer"][m])]
