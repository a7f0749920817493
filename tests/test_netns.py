"""The coordinator and a peer on two hosts: two network namespaces joined by a veth pair.

Nothing is given but the defaults (listen on all interfaces, announce what p2pd detects) and the coordinator's
multiaddr on the private link, proving that the defaults work across machines and not only on 127.0.0.1. The
addresses exist only inside the namespaces this test creates (and deletes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import spawn, stop_group, swarmtrain_cmd, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.netns]

SUBNET = "10.213.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and iproute2 (`ip`) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"stA{tag}", f"stB{tag}"
    veth_a, veth_b = f"va{tag}", f"vb{tag}"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _ip("link", "set", veth_a, "netns", ns_a)
        _ip("link", "set", veth_b, "netns", ns_b)
        for ns, dev, host in ((ns_a, veth_a, 1), (ns_b, veth_b, 2)):
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.timeout(240)
def test_coordinator_and_peer_on_two_hosts_with_default_addresses(two_hosts, tmp_path):
    ns_a, ns_b = two_hosts
    maddrs_file = tmp_path / "maddrs"
    in_a = ["ip", "netns", "exec", ns_a]
    in_b = ["ip", "netns", "exec", ns_b]
    coordinator = spawn(in_a + swarmtrain_cmd(
        "coordinator", "--run-id", "netns", "--identity", str(tmp_path / "coord.key"),
        "--maddrs-file", str(maddrs_file), "--checkpoint-every-s", "0"), str(tmp_path / "coordinator.log"))
    peer = None
    try:
        wait_for(lambda: maddrs_file.exists() and maddrs_file.read_text().strip(), 60, what="coordinator maddrs")
        maddrs = maddrs_file.read_text().split()
        link = [m for m in maddrs if f"/ip4/{SUBNET}.1/" in m]
        assert link, f"the coordinator does not announce its address on the link: {maddrs}"
        peer = spawn(in_b + swarmtrain_cmd(
            "peer", "--run-id", "netns", "--initial-peers", link[0], "--public-name", "far-away",
            "--max-experts", "16", "--threads", "1"), str(tmp_path / "peer.log"))

        def peer_trains():
            result = subprocess.run(in_a + swarmtrain_cmd("status", "--run-id", "netns", "--initial-peers", maddrs[0],
                                                          "--json", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"),
                                    capture_output=True, text=True, timeout=60)
            if result.returncode != 0 or not result.stdout.strip():
                return None
            status = json.loads(result.stdout.strip().splitlines()[-1])
            far = [hb for hb in status["peers"].values() if hb["public_name"] == "far-away"]
            return status if far and far[0]["steps"] > 0 else None

        status = wait_for(peer_trains, 150, interval=3, what="the peer in the other namespace to train")
        far = [hb for hb in status["peers"].values() if hb["public_name"] == "far-away"][0]
        assert any(f"/ip4/{SUBNET}.2/" in m for m in far["maddrs"]), far["maddrs"]
        assert len(far["experts"]) == 16  # it alone hosts every expert of the run
        assert "verified" in (tmp_path / "peer.log").read_text()
    finally:
        if peer is not None:
            stop_group(peer)
        stop_group(coordinator)
