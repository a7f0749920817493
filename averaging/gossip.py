"""Gossip averaging of replicated parameters: pairwise exchanges on each peer's own clock, no global barrier.

Not for: choosing what to train or when (the trainer), hosting experts (swarmtrain.expert_pool). The exchange
arithmetic lives in :mod:`~swarmtrain.averaging.rules` and :mod:`~swarmtrain.averaging.replica`, the message
flows in :mod:`~swarmtrain.averaging.exchange`, the wire format in :mod:`~swarmtrain.averaging.codec` and
:mod:`~swarmtrain.averaging.protocol`, partner discovery in :mod:`~swarmtrain.averaging.rendezvous`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from typing import AsyncIterator, Optional, Sequence

import torch
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarmtrain.averaging import exchange, protocol
from swarmtrain.averaging.base import AveragingStats
from swarmtrain.averaging.codec import LocalDataError, WireError
from swarmtrain.averaging.exchange import Meter, Outcome, Rejected
from swarmtrain.averaging.protocol import ProtocolError
from swarmtrain.averaging.rendezvous import Penalties, Rendezvous, choose_partners
from swarmtrain.averaging.replica import LocalReplica, wire_order
from swarmtrain.dht.budget import UploadBudget
from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import AveragingSpec

logger = logging.getLogger(__name__)

class GossipAverager(ServicerBase):
    """Keeps ``params`` close to the same parameters on other peers of ``group`` by pairwise gossip.

    Every ``spec.period_s`` (jittered) the averager announces itself in the DHT and starts an exchange with the
    live peer of its group it met least recently (:func:`~swarmtrain.averaging.rendezvous.choose_partners`).
    One exchange between initiator ``s`` and partner ``p`` (the ``rpc_exchange`` stream, see
    :mod:`~swarmtrain.averaging.protocol`):

    1. ``s`` streams its values ``A = Q(x_s + e_s)`` chunk by chunk (``Q``: ``spec.codec``, ``e_s``: its error
       feedback residual, zero for float32); ``p`` answers each chunk right away with ``B = Q(x_p - A)``, its
       values minus what it received, read under its lock; both sides then know the same move
       ``D = B ~ x_p - x_s``. With codec ``"8bit"``: ``B`` is 8-bit blockwise (a difference: small once peers
       agree, so its error shrinks with it), except that a partner farther away than its values are large sends
       ``Q(x_p)`` itself (``D = Q(x_p) - A``); ``A`` is 8-bit unless the partner is within
       a few 8-bit quantization errors (estimated from 4096 sampled values the partner sends with "accept"),
       then float16, since 8-bit *values* would keep the pair about 1% apart (``spec.adaptive_precision``; off:
       always 8-bit, about 1.01 bytes per element); tensors under 4096 elements always travel as float16.
       ``e_s`` is only kept with ``spec.error_feedback``. When ``s`` and ``p`` met before, both hold the same
       reference vector ``R`` from that exchange (:mod:`~swarmtrain.averaging.references`,
       ``spec.reference_partners``), and ``A = R + Q8(x_s - R)`` travels as 8-bit *differences* from it: one
       byte per element with an error that shrinks as the pair converges (CHOCO-gossip, Koloskova et al. 2019).
       ``spec.entropy_coding`` zstd-compresses every 8-bit message losslessly (~11% fewer bytes).
    2. ``s`` picks the mixing factor ``f = s(tau) * clip`` (``tau``: local steps since its first chunk,
       ``s(tau) = 1/sqrt(1 + tau)``; dropped above ``spec.max_staleness``; ``clip``: optional CenteredClip) and
       sends ``commit f``; ``p`` applies ``x_p -= alpha_p * D`` and answers ``done``; then ``s`` applies
       ``x_s += alpha_s * D``, with push-sum coefficients ``alpha`` from :func:`~swarmtrain.averaging.rules.mixing`
       (1/2 each for equal weights and f = 1).

    Both sides add a *delta* to whatever their parameters are by then, so local training progress made during
    the exchange is kept, and both deltas come from the same decoded ``D``, so the pair's weighted sum is
    preserved exactly even with lossy codecs: the swarm converges to the weighted mean (push-sum; Kempe et al.
    2003, Assran et al. 2019). With float32 and equal weights this is the plain rule
    ``x_p += (x_s - x_p) / 2``, ``x_s += (x_p - x_s) / 2``. With ``spec.mode == "diloco"`` the pair average is
    the target of an outer Nesterov step instead (:class:`~swarmtrain.averaging.rules.OuterNesterov`).

    A partner that is busy (in another exchange) is skipped for another; one that fails, stalls past
    ``spec.timeout_s`` or sends NaN/Inf, wrongly sized or outlying tensors is counted, penalized
    (:class:`~swarmtrain.averaging.rendezvous.Penalties`) and leaves our parameters untouched. Training never
    waits on the network: the averager only takes ``lock`` for short copies and additions.

    :param node: this peer's swarm node (its ``p2p`` serves ``rpc_exchange``/``rpc_state``, its loop runs us)
    :param directory: the run's directory, for the rendezvous records
    :param params: the replicated tensors, updated in place by the trainer while holding ``lock``
    :param lock: the trainer's lock around optimizer steps
    :param spec: the run's averaging settings (manifest)
    :param group: which parameters these are: ``"replicated"`` or an expert uid (averaging among its replicas)
    :param ttl_s: lifetime of the rendezvous record
    :param rendezvous: share one with the other averagers of this node (one DHT record for all groups)
    :param weight: initial push-sum weight (e.g. the peer's share of the data); the swarm converges to the
        weight-averaged parameters
    :param seed: seeds partner choice and clock jitter (tests, benchmarks)

    Example::

        averager = GossipAverager(node, directory, [p.data for p in model.parameters()], lock, manifest.averaging)
        averager.load_state_from_peers()
        averager.start()
        ...                                      # trainer: with lock: opt.step(); averager.on_local_step(step, n)
        print(averager.stats().rounds)
        averager.shutdown()
    """

    def __init__(
        self,
        node: SwarmNode,
        directory: SwarmDirectory,
        params: Sequence[torch.Tensor],
        lock: threading.Lock,
        spec: AveragingSpec,
        group: str = "replicated",
        ttl_s: float = 10.0,
        *,
        rendezvous: Optional[Rendezvous] = None,
        weight: float = 1.0,
        seed: Optional[int] = None,
        budget: Optional[UploadBudget] = None,
    ):
        if node.p2p is None:
            raise ValueError("GossipAverager needs a SwarmNode started with its p2p handle (start_p2p=True)")
        if not group or len(group) > 64 or not all(c.isalnum() or c in "._-" for c in group):
            raise ValueError(f"invalid averaging group {group!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
        self.node, self.spec, self.group, self.peer_id = node, spec, group, node.peer_id
        if not 0 < weight < 1e9:
            raise ValueError(f"push-sum weight must be in (0, 1e9), got {weight}")
        self._shapes = [tuple(p.shape) for p in params]
        self.replica = LocalReplica(params, lock, spec, name=group)
        self.replica.weight = float(weight)
        self.rendezvous = rendezvous if rendezvous is not None else Rendezvous(directory, ttl_s=ttl_s)
        self.namespace = f"swarmtrain.{node.run_id}.avg.{group}"
        # unreachable partners are retried within a few periods (a cut cable comes back); bad data bans for long
        self.penalties = Penalties(base_s=min(2 * spec.period_s, 60.0), max_unreachable_s=max(spec.period_s, 2.0))
        self.meter = Meter(budget)
        self._rng = random.Random(seed)
        self._local_step = self._samples = 0
        self._session: Optional[object] = None  # token of the exchange in progress (either role)
        self._last_met: dict[str, float] = {}
        # peer -> (our state, its state) right after our last exchange, if it left the pair in agreement (not
        # one with 8-bit values, whose quantization error keeps the pair apart): while neither state changes,
        # averaging again would change nothing
        self._synced: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._counts = dict(rounds=0, failures=0, served=0, busy=0, rejected=0, stale_dropped=0, relative=0)
        self._last_partner: Optional[str] = None
        self._last_round_s: Optional[float] = None
        self._task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None  # set on shutdown: ends the clock's sleep
        self._started = self._stopped = False

    # ---- the interface the trainer uses (swarmtrain.averaging.base.ParameterAverager) ----

    def start(self) -> None:
        """Serve exchanges, announce this peer in the DHT and begin averaging every ``spec.period_s``."""
        if self._stopped:
            raise RuntimeError("this averager was shut down; create a new one")
        if self._started:
            return
        self._started = True
        self.replica.start_outer()
        self.node.loop.run(self._astart(), timeout=60)

    def on_local_step(self, local_step: int, samples: int) -> None:
        """Record the trainer's step counter and its total samples so far (two assignments: never blocks)."""
        self._local_step = int(local_step)
        self._samples = int(samples)

    def stats(self) -> AveragingStats:
        return AveragingStats(
            bytes_sent=self.meter.sent, bytes_received=self.meter.received, last_partner=self._last_partner,
            last_round_s=self._last_round_s, **self._counts,
        )

    def load_state_from_peers(self, timeout_s: float = 30) -> bool:
        """Overwrite ``params`` with those of the live peer of this group with the most samples (falling back
        to others); False if there is none or none answered within ``timeout_s``. Call from any thread but the
        node's loop."""
        return self.node.loop.run(self._aload_state(timeout_s), timeout=timeout_s + 10)

    def load_parameters(self, values: Sequence[torch.Tensor]) -> None:
        """Overwrite ``params`` with ``values`` (same order and shapes as the constructor's ``params``), e.g. from
        a checkpoint. Unlike writing into the tensors directly, this also resets what the replica derived from the
        old values (its version, and the outer optimizer's anchor in diloco mode)."""
        values = list(values)
        if [tuple(v.shape) for v in values] != self._shapes:
            raise ValueError(f"averager {self.group}: values do not have the shapes of the averaged parameters")
        self.replica.load(torch.cat([v.detach().reshape(-1).float().cpu() for v in wire_order(values)]))

    def shutdown(self) -> None:
        """Stop averaging, stop serving, and withdraw this group from the rendezvous record; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._started and self.node.loop.loop.is_running():  # else the node is gone, and our handlers with it
            try:
                self.node.loop.run(self._astop(), timeout=self.spec.timeout_s + 15)
            except Exception as e:  # the node may be shutting down too
                logger.warning(f"averager {self.group}: clean shutdown failed ({type(e).__name__}: {e})")
        self.replica.shutdown()

    def average_once(self, peer: Optional[str] = None) -> str:
        """Run one exchange now, as the initiator, with ``peer`` or with a partner chosen as the clock would.

        Returns "ok", "busy", "unchanged" (the partner and we still agree since our last exchange), "failed",
        "rejected", "stale", "local" (our own values are not finite) or "alone" (no partner). For tests,
        benchmarks and for flushing before a checkpoint; the background clock does the same every
        ``spec.period_s``.
        """
        return self.node.loop.run(self._round(peer), timeout=3 * self.spec.timeout_s + 30)

    @property
    def busy(self) -> bool:
        """Whether an exchange (either role) is in progress right now."""
        return self._session is not None

    @property
    def weight(self) -> float:
        """This peer's push-sum weight (the swarm converges to the weight-averaged parameters)."""
        return self.replica.weight

    # ---- RPC surface ----

    async def rpc_exchange(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Serve one exchange as the partner (see the class docstring and swarmtrain.averaging.protocol)."""
        remote = context.remote_id.to_base58()
        try:
            first = self.meter.inp(await asyncio.wait_for(anext(requests), self.spec.timeout_s))
            hello = exchange.check_hello(self.replica, self.group, first)
        except ProtocolError as e:
            self._counts["rejected"] += 1
            logger.warning(f"averager {self.group}: refused exchange from {remote}: {e}")
            yield self.meter.out(protocol.response("refuse", reason=str(e)[:200]))
            return
        except (asyncio.TimeoutError, StopAsyncIteration):
            return
        # a peer we merely failed to reach is served (it reaches us now: e.g. its cable is back); one that sent bad
        # data is refused until its ban ends
        if self.busy or not self._started or self._stopped or self.penalties.distrusted(remote):
            reason = "banned" if self.penalties.distrusted(remote) else "busy"
            yield self.meter.out(protocol.response("refuse", reason=reason))
            return
        if hello.get("unchanged_if") == [self.replica.version, self._local_step]:
            yield self.meter.out(protocol.response("refuse", reason="unchanged"))
            return
        token = self._session = object()
        # a dead initiator can leave the stream blocked in a write that never times out: give up on our side
        outcome = Outcome()
        watchdog = asyncio.get_running_loop().call_later(
            self.spec.timeout_s, self._expire, token, asyncio.current_task(), remote, outcome
        )
        try:
            async for message in exchange.serve(self.replica, hello, requests, self.meter, outcome,
                                                lambda: self._session is token, self._local_step, remote):
                yield await self.meter.paced(message)
        finally:
            watchdog.cancel()
            logger.debug(f"averager {self.group}: served {remote}: {outcome.result} {outcome.error} "
                         f"(session {'ours' if self._session is token else 'gone'})")
            if self._session is token:
                self._session = None
                self._record(remote, outcome.result, outcome.error, served=True)
                self._counts["relative"] += int(outcome.result == "ok" and outcome.relative)
                state = hello.get("state")
                if outcome.result == "ok" and outcome.agree and isinstance(state, list) and len(state) == 2:
                    self._synced[remote] = (self._state(), (int(state[0]) + 1, int(state[1])))

    async def rpc_state(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stream our current parameters (float32, one consistent snapshot) to a joining peer."""
        async for message in exchange.serve_state(self.replica, self.meter.inp(request), self.meter):
            yield message

    # ---- background clock ----

    async def _astart(self) -> None:
        await self.add_p2p_handlers(self.node.p2p, namespace=self.namespace)
        self.rendezvous.join(self.group, lambda: self._samples)
        await self.rendezvous.announce(force=True)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _astop(self) -> None:
        if self._task is not None:  # let an exchange in flight finish (_run checks _stopped), then cancel
            self._wake.set()
            await asyncio.wait({self._task}, timeout=self.spec.timeout_s + 1)
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
        deadline = time.monotonic() + self.spec.timeout_s + 1
        while self.busy and time.monotonic() < deadline:  # a served exchange (new ones are refused by now)
            await asyncio.sleep(0.01)
        self.rendezvous.leave(self.group)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.rendezvous.announce(force=True), 5)
        with contextlib.suppress(Exception):
            await self.remove_p2p_handlers(self.node.p2p, namespace=self.namespace)

    async def _run(self) -> None:
        await self._sleep(self._rng.uniform(0, self.spec.period_s))
        while not self._stopped:
            try:
                await self.rendezvous.announce()
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a DHT hiccup: say so, keep averaging
                self._counts["failures"] += 1
                logger.warning(f"averager {self.group}: round failed: {type(e).__name__}: {e}", exc_info=True)
            await self._sleep(self.spec.period_s * self._rng.uniform(0.75, 1.25))

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if shutdown() is called meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _round(self, peer: Optional[str] = None) -> str:
        """Try up to three partners (or just ``peer``), moving on only while they are busy."""
        if self.busy:
            return "busy"  # serving someone right now: that counts as this period's exchange
        if peer is None:
            found = await self.rendezvous.partners(self.group)
            order = choose_partners([p for p in found if not self.penalties.banned(p)], self._last_met, self._rng,
                                    last=self._last_partner)
        else:
            order = [peer]
        outcome = "alone"
        for partner in order:
            if self.busy:
                return "busy"
            outcome = await self._initiate(partner)
            if outcome not in ("busy", "unchanged"):
                break
        return outcome

    async def _initiate(self, peer: str) -> str:
        """Run one exchange with ``peer`` as the initiator: "ok", "busy", "failed", "rejected" or "stale"."""
        token = self._session = object()
        started = time.perf_counter()
        stub = self.get_stub(self.node.p2p, PeerID.from_base58(peer), namespace=self.namespace)
        synced = self._synced.get(peer)
        unchanged_if = synced[1] if synced is not None and synced[0] == self._state() else None
        partner: dict = {}
        why = ""
        try:  # initiate() enforces spec.timeout_s per step itself: an outer timeout could split an exchange
            outcome = await exchange.initiate(
                self.replica, stub.rpc_exchange, self.meter, self.group, lambda: self._local_step, unchanged_if,
                partner, peer,
            )
            self._counts["relative"] += int(outcome == "ok" and partner.get("relative", False))
            if outcome == "ok" and "state" in partner and partner.get("agree"):
                version, step = partner["state"]
                self._synced[peer] = (self._state(), (version + 1, step))
        except asyncio.TimeoutError as e:
            outcome, why = "failed", f"no answer in time: {e}"
        except LocalDataError as e:
            outcome, why = "local", str(e)
        except (Rejected, ProtocolError, WireError) as e:
            outcome, why = "rejected", str(e)
        except Exception as e:
            outcome, why = "failed", f"{type(e).__name__}: {e}"
        finally:
            if self._session is token:
                self._session = None
        if outcome not in ("busy", "unchanged"):
            self._last_met[peer] = time.monotonic()
        self._record(peer, outcome, why)
        if outcome == "ok":
            self._last_round_s = time.perf_counter() - started
        return outcome

    def _state(self) -> tuple[int, int]:
        """(exchanges applied, local step): changes whenever our parameters may have."""
        return self.replica.version, self._local_step

    def _record(self, peer: str, outcome: str, why: str, served: bool = False) -> None:
        """Count an exchange's outcome and reward or penalize the partner."""
        if outcome == "ok":
            self._counts["rounds"] += 1
            self._counts["served"] += int(served)
            self._last_partner = peer
            self._last_met[peer] = time.monotonic()
            self.penalties.forgive(peer)
        elif outcome in ("busy", "unchanged"):
            self._counts["busy"] += 1
        elif outcome == "stale":
            self._counts["stale_dropped"] += 1
        elif outcome == "local":
            self._counts["failures"] += 1
            logger.warning(f"averager {self.group}: not averaging with {peer}, our own parameters are bad: {why}")
        elif outcome in ("failed", "rejected"):
            self._counts["failures" if outcome == "failed" else "rejected"] += 1
            skip_s = self.penalties.strike(peer, bad_data=outcome == "rejected", refuse=served)
            role = "from" if served else "with"
            log = logger.warning if outcome == "rejected" else logger.info
            log(f"averager {self.group}: exchange {role} {peer} {outcome}: {why} (skipping it for {skip_s:.0f}s)")

    def _expire(self, token: object, task: asyncio.Task, remote: str, outcome: Outcome) -> None:
        """Watchdog: a served exchange ran past ``spec.timeout_s``; stop waiting for it (nothing is applied)."""
        if self._session is token and not outcome.committing:
            self._session = None
            self._record(remote, "failed", f"no progress within {self.spec.timeout_s}s", served=True)
            task.cancel()

    async def _aload_state(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        found = await self.rendezvous.partners(self.group, fresh=True)
        for peer in sorted(found, key=lambda p: -found[p].samples):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            stub = self.get_stub(self.node.p2p, PeerID.from_base58(peer), namespace=self.namespace)
            try:
                state = await asyncio.wait_for(
                    exchange.fetch_state(self.replica, stub.rpc_state, self.meter, self.group), remaining
                )
            except Exception as e:
                self._counts["failures"] += 1
                logger.info(f"averager {self.group}: state from {peer} failed: {type(e).__name__}: {e}")
                continue
            await self.replica.call(self.replica.load, state)
            logger.info(f"averager {self.group}: loaded {self.replica.numel} parameters from {peer}")
            return True
        return False
