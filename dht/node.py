"""Starting a swarm DHT node: multiaddr validation, bootstrap with retries, and the p2p handle for services.

A :class:`SwarmNode` is one hivemind DHT (its own process plus a p2pd daemon) with the swarm's record validator,
an asyncio loop thread in this process, and a replica of the DHT's libp2p handle on that loop so that services
(the expert pool, the averager) can register ``rpc_*`` handlers and call other peers over the same daemon.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Coroutine, Optional, Sequence, TypeVar

import hivemind
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from swarmtrain.dht.identity import Identity
from swarmtrain.dht.validator import SwarmRecordValidator

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)


class BootstrapError(RuntimeError):
    """None of the initial peers could be reached after all retries."""


def parse_maddrs(values: Sequence[str], *, what: str, need_peer_id: bool = False) -> list[Multiaddr]:
    """Parse user-given multiaddrs; raise ValueError naming the first bad one and why."""
    result = []
    for value in values:
        value = value.strip()
        try:
            maddr = Multiaddr(value)
        except Exception as e:
            raise ValueError(f"invalid multiaddr in {what}: {value!r} ({e})") from None
        protocols = [p.name for p in maddr.protocols()]
        if not protocols or protocols[0] not in ("ip4", "ip6", "dns", "dns4", "dns6", "p2p"):
            raise ValueError(f"invalid multiaddr in {what}: {value!r} (must start with /ip4, /ip6 or /dns)")
        if need_peer_id and "p2p" not in protocols:
            raise ValueError(f"invalid multiaddr in {what}: {value!r} (must end with /p2p/<peer id>)")
        result.append(maddr)
    return result


def peer_id_of(maddr: Multiaddr) -> Optional[str]:
    """The ``/p2p/<peer id>`` component of a multiaddr, if any."""
    try:
        return maddr.value_for_protocol("p2p")
    except Exception:
        return None


class LoopThread:
    """An asyncio (uvloop when available) event loop running in a daemon thread of this process."""

    def __init__(self, name: str = "swarmtrain-loop"):
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class SwarmNode:
    """One DHT node of a run plus its p2p handle.

    :param run_id: run whose records this node signs and validates
    :param identity: key file giving the peer id (also signs records)
    :param initial_peers: multiaddrs to bootstrap from (empty for the first node, i.e. the coordinator)
    :param trusted_coordinator: peer id whose manifest is trusted; default: the peer id of the first initial peer
    :param host_maddrs / announce_maddrs: where to listen / what to tell others (defaults listen on all interfaces)
    :param client_mode: do not accept incoming connections (for peers behind NAT)
    :param use_relay / use_auto_relay: libp2p circuit relay options passed to p2pd
    :param bootstrap_attempts: tries to reach the initial peers, with exponential backoff between them

    Example::

        node = SwarmNode("demo", Identity.load_or_create("peer.key"), initial_peers=["/ip4/1.2.3.4/tcp/31337/p2p/Qm.."])
        print(node.visible_maddrs())
        node.shutdown()
    """

    def __init__(
        self,
        run_id: str,
        identity: Identity,
        *,
        initial_peers: Sequence[str] = (),
        trusted_coordinator: Optional[str] = None,
        host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS,
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        use_relay: bool = True,
        use_auto_relay: bool = False,
        bootstrap_attempts: int = 6,
        bootstrap_backoff_s: float = 1.0,
        start_p2p: bool = True,
    ):
        initial = parse_maddrs(initial_peers, what="--initial-peers", need_peer_id=True)
        hosts = parse_maddrs(host_maddrs, what="--host-maddrs")
        announce = parse_maddrs(announce_maddrs, what="--announce-maddrs")
        if trusted_coordinator is None and initial:
            trusted_coordinator = peer_id_of(initial[0])
        self.run_id = run_id
        self.identity = identity
        self.trusted_coordinator = trusted_coordinator or identity.peer_id
        self.validator = SwarmRecordValidator(run_id, identity, self.trusted_coordinator)
        try:
            self.dht = self._start_dht(
                initial, hosts, announce, client_mode, use_relay, use_auto_relay, bootstrap_attempts,
                bootstrap_backoff_s,
            )
        finally:
            identity.discard()  # p2pd has read a throwaway key by now (a key given by the user is never deleted)
        self.peer_id = identity.peer_id
        self.client_mode = client_mode
        self.loop = LoopThread()
        try:
            self.p2p: Optional[P2P] = self.loop.run(self.dht.replicate_p2p(), timeout=60) if start_p2p else None
        except BaseException:
            self.loop.stop()
            self.dht.shutdown()
            raise

    def _start_dht(self, initial, hosts, announce, client_mode, use_relay, use_auto_relay, attempts, backoff):
        delay = backoff
        for attempt in range(1, max(1, attempts) + 1):
            try:
                return hivemind.DHT(
                    initial_peers=[str(m) for m in initial],
                    host_maddrs=[str(m) for m in hosts],
                    announce_maddrs=[str(m) for m in announce] or None,
                    client_mode=client_mode,
                    identity_path=self.identity.path,
                    # a fresh random key cannot be in use elsewhere: skip hivemind's extra probe daemon for it
                    check_if_identity_free=not self.identity.is_throwaway,
                    record_validators=[self.validator],
                    use_relay=use_relay,
                    use_auto_relay=use_auto_relay,
                    start=True,
                    await_ready=True,
                )
            except Exception as e:
                if not initial:
                    raise BootstrapError(f"could not start the DHT node: {e}") from e
                if attempt >= attempts:
                    raise BootstrapError(
                        f"could not reach any initial peer {[str(m) for m in initial]} after {attempts} attempts: {e}"
                    ) from e
                logger.warning(f"initial peers unreachable (attempt {attempt}/{attempts}: {e}); retrying in {delay:.0f}s")
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs (with /p2p/<peer id>) other peers can use to reach this node."""
        return [str(m) for m in self.dht.get_visible_maddrs(latest=True)]

    def shutdown(self) -> None:
        """Stop the p2p handle, the loop thread and the DHT process (and its p2pd)."""
        if self.p2p is not None:
            try:
                self.loop.run(self.p2p.shutdown(), timeout=5)
            except Exception as e:  # the daemon may already be gone
                logger.debug(f"p2p replica shutdown: {e}")
            self.p2p = None
        self.loop.stop()
        if self.dht.is_alive():
            self.dht.shutdown()
        self.dht.join(timeout=10)
