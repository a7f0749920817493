"""Keeping the dashboard's client-mode DHT node connected to the swarm.

hivemind drops a node from the routing table the first time an RPC to it times out (3 s by default), and a
client-mode node gets no incoming requests to learn nodes back from. On a busy machine the dashboard's node can
so lose every neighbour, after which every read returns nothing and, without this module, the page would show a
healthy swarm as gone. The collector asks :func:`routing_table_size` each poll and, when it is zero, pings peers
it already knows (the coordinator and non-client peers seen in heartbeats) with :func:`reconnect`.

Pinging is a DHT liveness RPC: it stores nothing and changes no swarm record.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Iterable

import hivemind

RECONNECT_TIMEOUT_S = 10.0


def routing_table_size(dht: hivemind.DHT) -> int:
    """How many DHT nodes this node can currently route requests to."""
    return int(dht.run_coroutine(_routing_table_size))


def reconnect(dht: hivemind.DHT, peer_ids: Iterable[str]) -> int:
    """Ping ``peer_ids`` (base58) so that those that answer re-enter the routing table; return its new size."""
    peer_ids = sorted(set(peer_ids))
    if not peer_ids:
        return routing_table_size(dht)
    return int(dht.run_coroutine(functools.partial(_ping_all, peer_ids=peer_ids)))


async def _routing_table_size(dht: hivemind.DHT, node: hivemind.DHTNode) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


async def _ping_all(dht: hivemind.DHT, node: hivemind.DHTNode, peer_ids: list[str]) -> int:
    from hivemind.p2p import PeerID

    pings = [node.protocol.call_ping(PeerID.from_base58(peer_id)) for peer_id in peer_ids]
    try:
        await asyncio.wait_for(asyncio.gather(*pings, return_exceptions=True), RECONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        pass  # whoever answered in time is back in the table; the size says how many
    return len(node.protocol.routing_table.uid_to_peer_id)
