"""A stand-alone expert host process: one SwarmNode + ExpertServer + registry, nothing else.

Used by the expert pool's tests and benchmark (a server in a separate process), and usable to lend a box's CPU
to a run without training on it. The manifest comes from a JSON file (the peer daemon instead reads the
coordinator's signed manifest from the DHT). When ready it prints one JSON line
``{"peer_id": ..., "maddrs": [...], "experts": [...]}`` to stdout; it stops on SIGTERM / SIGINT or when its stdin
closes, shutting its DHT and p2pd down.

Example::

    python -m swarmtrain.expert_pool.host --manifest manifest.json --experts text.0.0 text.0.1 \\
        --host-maddrs /ip4/127.0.0.1/tcp/0 --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm...
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Optional, Sequence

import torch

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import Manifest
from swarmtrain.expert_pool.activations import DEFAULT_MAX_BYTES
from swarmtrain.expert_pool.registry import ExpertRegistry
from swarmtrain.expert_pool.server import ExpertServer


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="path of the run manifest as JSON")
    parser.add_argument("--experts", nargs="+", required=True, help="uids to host")
    parser.add_argument("--identity", default=None, help="key file (default: a throwaway identity)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--handler-threads", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--max-wait-s", type=float, default=0.0)
    parser.add_argument("--activation-cache-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,
                        help="memory for activations kept between a caller's forward and backward (0: recompute)")
    parser.add_argument("--ttl-s", type=float, default=30.0)
    parser.add_argument("--refresh-s", type=float, default=2.0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    with open(args.manifest) as f:
        manifest = Manifest.model_validate_json(f.read())
    node = SwarmNode(
        manifest.run_id,
        Identity.load_or_create(args.identity),
        initial_peers=args.initial_peers,
        trusted_coordinator=manifest.coordinator,
        host_maddrs=args.host_maddrs,
    )
    server = ExpertServer(
        node.p2p, node.loop, manifest, handler_threads=args.handler_threads, max_wait_s=args.max_wait_s,
        activation_cache_bytes=int(args.activation_cache_mb * 2**20),
    )
    registry = None
    try:
        for uid in args.experts:
            server.add_expert(uid)
        server.start()
        registry = ExpertRegistry(SwarmDirectory(node.dht, manifest.run_id, node.peer_id), server, args.ttl_s,
                                  args.refresh_s)
        registry.publish()
        registry.start()
        print(json.dumps({"peer_id": node.peer_id, "maddrs": node.visible_maddrs(), "experts": args.experts}),
              flush=True)
        _wait_for_stop()
    finally:
        if registry is not None:
            registry.stop()
        server.shutdown()
        node.shutdown()


def _wait_for_stop() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed our stdin or died
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass


if __name__ == "__main__":
    main()
