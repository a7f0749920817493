"""Calling experts across the swarm: :class:`RemoteDispatcher`, the swarm implementation of ``ExpertDispatcher``.

For one micro-batch, ``dispatch(x, expert_idx, modality, layer)`` groups the (row, choice) pairs by expert and
sends ONE request per chosen expert (its rows gathered with ``index_select``), all in flight at once on the
peer's event loop; outputs are scattered back with ``index_copy``. Backward goes through a custom autograd
Function that likewise sends one backward request per expert concurrently (to the host that answered the forward)
and scatter-adds the returned input gradients into ``grad_x``. Experts hosted by this peer's own
:class:`~swarmtrain.expert_pool.server.ExpertServer` are called in-process while the remote calls are in flight.

Requests to one host travel on one long-lived stream (:mod:`~swarmtrain.expert_pool.session`), still one request
per expert: opening a libp2p stream per request would cost ~10x more CPU than the request itself.

This replaces hivemind's ``RemoteMixtureOfExperts``, which issues one RPC per (sample, expert) pair.

Failures never raise out of ``dispatch``: an expert whose hosts all fail or miss their deadlines (per host, from
its measured latency: :mod:`~swarmtrain.expert_pool.links`; at most ``timeout_s`` in all) is marked not answered
(the model renormalises its gates over answered choices); a host that answered nothing since the request left is
banned with exponential backoff (0.5 s to 8 s), then retried, while a merely slow one is not. A forward is hedged
to a second replica when the first is late. A failed backward call leaves zero gradient for its rows, is logged
and counted in :attr:`RemoteDispatcher.stats`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from hivemind.p2p import P2P, PeerID

from swarmtrain.dht.budget import UploadBudget
from swarmtrain.dht.node import LoopThread
from swarmtrain.dht.records import Manifest
from swarmtrain.dht.uids import make_uid
from swarmtrain.expert_pool.codec import all_finite, check_codec, decode_tensor, encode_tensor
from swarmtrain.expert_pool.links import SILENT, LinkPolicy, LinkTable, classify_timeout
from swarmtrain.expert_pool.registry import ExpertRegistry
from swarmtrain.expert_pool.server import ExpertServer
from swarmtrain.expert_pool.session import SessionPool
from swarmtrain.expert_pool.wire import DEFAULT_CHUNK_BYTES, Call, pack_request, read_call

logger = logging.getLogger(__name__)
LOCAL = "<local>"  # host marker of experts served by this process
HOME_UPLINK_MBPS = 100.0  # a declared upload budget below this makes every remote call cost the most in routing


class ExpertCallError(RuntimeError):
    """A remote expert call failed; ``refused`` is True when the host answered with an error (bad request,
    expert not hosted) rather than failing to answer; ``resend`` is True when a backward quoted activations the
    host no longer keeps (the call is repeated with the inputs, nobody is banned)."""

    def __init__(self, message: str, refused: bool = False, resend: bool = False):
        super().__init__(message)
        self.refused, self.resend = refused, resend


async def call_expert(
    p2p: P2P,
    peer_id: str,
    verb: str,
    uid: str,
    tensors: Sequence[torch.Tensor],
    codec: str = "none",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[torch.Tensor]:
    """One ``rpc_forward`` / ``rpc_backward`` call to ``peer_id``; raise ExpertCallError with the host's reason."""
    messages = pack_request(uid, {"codec": codec}, [encode_tensor(t, codec) for t in tensors], chunk_bytes)
    return (await _call(p2p, peer_id, verb, messages))[1]


async def fetch_expert_state(p2p: P2P, peer_id: str, uid: str) -> dict[str, torch.Tensor]:
    """The parameters of expert ``uid`` as hosted by ``peer_id`` (to take over hosting it)."""
    meta, tensors = await _call(p2p, peer_id, "state", pack_request(uid, {}, []))
    names = meta.get("names")
    if not isinstance(names, list) or len(names) != len(tensors) or not all(isinstance(n, str) for n in names):
        raise ExpertCallError(f"malformed state of {uid} from {peer_id}: names {names!r} for {len(tensors)} tensors")
    return dict(zip(names, tensors))


@dataclass
class DispatchStats:
    """Counters of a dispatcher (calls are per expert per micro-batch)."""

    forward_calls: int = 0
    forward_failures: int = 0
    backward_calls: int = 0
    backward_failures: int = 0  # backward calls whose rows got zero gradient
    local_calls: int = 0
    remote_forward_calls: int = 0  # forward calls that crossed the network (the rest ran in-process)
    resent: int = 0  # backward calls that had to resend x because the host no longer kept the activations
    bytes_sent: int = 0  # tensor payload bytes of remote requests (after the wire codec)
    bytes_received: int = 0
    timeouts: int = 0  # calls given up on a host that answered nothing since our request left (banned)
    slow: int = 0  # calls given up on a host that kept answering, or still queued in our own uplink (no ban)
    last_error: str = ""  # the latest failure, "<verb> <uid>: <reason>"


class HostBans:
    """Exponential-backoff bans of failing hosts: ``base_s * 2**(failures-1)``, at most ``max_s``.

    A host that fails to answer is banned as a whole; a host that refuses a call (e.g. no longer hosts the expert)
    is banned for that expert only. A success clears the failure count.
    """

    def __init__(self, base_s: float = 1.0, max_s: float = 60.0):
        self.base_s, self.max_s = base_s, max_s
        self._failures: dict[tuple[str, Optional[str]], tuple[int, float]] = {}
        self._lock = threading.Lock()

    def banned(self, peer_id: str, uid: Optional[str] = None) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(self._failures.get(key, (0, 0.0))[1] > now for key in ((peer_id, None), (peer_id, uid)))

    def failure(self, peer_id: str, uid: Optional[str] = None) -> float:
        """Record a failure; returns the ban length in seconds."""
        with self._lock:
            count = self._failures.get((peer_id, uid), (0, 0.0))[0] + 1
            duration = min(self.base_s * 2 ** (count - 1), self.max_s)
            self._failures[(peer_id, uid)] = (count, time.monotonic() + duration)
            return duration

    def success(self, peer_id: str, uid: Optional[str] = None) -> None:
        with self._lock:
            self._failures.pop((peer_id, None), None)
            self._failures.pop((peer_id, uid), None)


@dataclass
class _Route:
    """The rows of one micro-batch that go to one expert."""

    uid: str
    positions: torch.Tensor  # indices into the flattened [N * k] (row, choice) pairs
    rows: torch.Tensor  # indices into x [N]
    host: Optional[str] = None  # who answered the forward (LOCAL, a peer id, or None: not answered)
    error: str = field(default="", repr=False)
    saved: Optional[int] = None  # the host keeps this forward's activations under this number (remote hosts)
    local_saved: Optional[tuple] = field(default=None, repr=False)  # the same, for experts called in-process


class RemoteDispatcher:
    """The mixture-of-experts layer's link to the swarm (implements ``ExpertDispatcher``).

    :param p2p: this peer's p2p replica (``SwarmNode.p2p``)
    :param loop: the loop thread of that replica (``SwarmNode.loop``)
    :param registry: who hosts which expert (refreshed in the background)
    :param manifest: the run manifest (hidden size, ``expert_pool.timeout_s``, wire codec)
    :param local_server: this peer's own expert server; its experts are called in-process
    :param timeout_s: per-expert call timeout (default ``manifest.expert_pool.timeout_s``)
    :param codec: wire codec (default ``manifest.expert_pool.wire_codec``; ``"auto"`` chooses per host link)
    :param bans: which hosts to skip for now (default: 0.5 s doubling to at most 8 s per failure)
    :param links: per-host link estimates that set deadlines, hedging, codecs and routing costs
    :param budget: this peer's upload budget (expert requests are interactive traffic)

    Example::

        dispatcher = RemoteDispatcher(node.p2p, node.loop, registry, manifest, local_server=server)
        out, answered = dispatcher.dispatch(x, top_k_indices, "text", layer=0)   # out: [N, k, d], differentiable
    """

    def __init__(
        self,
        p2p: P2P,
        loop: LoopThread,
        registry: ExpertRegistry,
        manifest: Manifest,
        local_server: Optional[ExpertServer] = None,
        timeout_s: Optional[float] = None,
        codec: Optional[str] = None,
        bans: Optional[HostBans] = None,
        links: Optional[LinkTable] = None,
        budget: Optional[UploadBudget] = None,
    ):
        self.p2p, self.loop, self.registry, self.manifest = p2p, loop, registry, manifest
        self.local_server = local_server
        self.hidden = manifest.model.hidden
        self.timeout_s = float(timeout_s if timeout_s is not None else manifest.expert_pool.timeout_s)
        self.codec = codec or manifest.expert_pool.wire_codec
        if self.codec != "auto":
            check_codec(self.codec)
        # a host that answers nothing is retried soon (a cut cable may come back), never after more than 8 s
        self.bans = bans or HostBans(base_s=0.5, max_s=8.0)
        # a volunteer who declared a home uplink pays the full routing cost for every remote call: its uplink,
        # not the host's latency, is what a call costs it
        home_uplink = budget is not None and budget.limited and budget.mbps < HOME_UPLINK_MBPS
        self.links = links or LinkTable(LinkPolicy(max_deadline_s=self.timeout_s,
                                                   remote_floor=1.0 if home_uplink else LinkPolicy.remote_floor))
        self.stats = DispatchStats()
        self.my_peer_id = registry.directory.peer_id
        self._sessions = SessionPool(p2p, budget, on_late=self.links.observe_late)

    def close(self) -> None:
        """Close the sessions to hosts (they are also dropped when the p2p replica shuts down)."""
        self.loop.run(self._sessions.close(), timeout=30)

    def live_mask(self, modality: str, layer: int, num_experts: int) -> torch.Tensor:
        """Bool ``[num_experts]``: hosted here, or by a live remote host that is not banned."""
        uids = [make_uid(modality, layer, i) for i in range(num_experts)]
        return torch.tensor([self._callable(uid) for uid in uids], dtype=torch.bool)

    def call_costs(self, modality: str, layer: int, num_experts: int) -> torch.Tensor:
        """Float ``[num_experts]``: 0 for experts hosted here, else the link cost of the cheapest live host
        (``LinkTable.cost``: 1 for a slow or unmeasured link, down to 0.25 for a fast one)."""
        costs = []
        for i in range(num_experts):
            uid = make_uid(modality, layer, i)
            if self._hosted_here(uid):
                costs.append(0.0)
            else:
                costs.append(min((self.links.cost(host) for host in self._remote_hosts(uid)), default=1.0))
        return torch.tensor(costs)

    def dispatch(
        self, x: torch.Tensor, expert_idx: torch.Tensor, modality: str, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run rows of ``x [N, d]`` through experts ``expert_idx [N, k]``: (outputs [N, k, d], answered [N, k])."""
        if x.ndim != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"dispatch expects x of shape [N, {self.hidden}], got {list(x.shape)}")
        if expert_idx.ndim != 2 or expert_idx.shape[0] != x.shape[0]:
            raise ValueError(f"expert_idx must be [N={x.shape[0]}, k], got {list(expert_idx.shape)}")
        if expert_idx.numel() and int(expert_idx.min()) < -1:
            raise ValueError("expert_idx must be >= 0, or -1 for a choice dropped by the capacity limit")
        n, k = expert_idx.shape
        flat_idx = expert_idx.reshape(-1).cpu()
        flat_rows = torch.arange(n).repeat_interleave(k)
        order = torch.argsort(flat_idx, stable=True)
        experts, counts = torch.unique_consecutive(flat_idx[order], return_counts=True)
        routes = [
            _Route(make_uid(modality, layer, int(e)), positions, flat_rows[positions])
            for e, positions in zip(experts.tolist(), order.split(counts.tolist()))
            if e >= 0  # -1: dropped by the caller's capacity limit, never sent, never answered
        ]
        # a forward whose backward will follow asks the hosts to keep its activations (no recomputed forward, no
        # x sent again); under no_grad (evaluation) nothing is kept
        keep = torch.is_grad_enabled() and x.requires_grad
        out, answered = _DispatchFunction.apply(x, self, routes, k, keep)
        return out.view(n, k, x.shape[1]), answered.view(n, k)

    # ---- calls -------------------------------------------------------------------------------------------------

    def _callable(self, uid: str) -> bool:
        return self._hosted_here(uid) or bool(self._remote_hosts(uid))

    def _hosted_here(self, uid: str) -> bool:
        return self.local_server is not None and self.local_server.is_hosted(uid)

    def _remote_hosts(self, uid: str) -> list[str]:
        return [
            peer for peer, _ in self.registry.hosts(uid) if peer != self.my_peer_id and not self.bans.banned(peer, uid)
        ]

    def run_calls(
        self, verb: str, routes: Sequence[_Route], inputs: Sequence[tuple[torch.Tensor, ...]], keep: bool = False
    ) -> list:
        """Run one call per route (remote ones concurrently on the loop, local ones in this thread meanwhile);
        returns per route the output tensor or None if that expert failed. A forward with ``keep`` has the hosts
        keep its activations for the backward (``route.saved`` / ``route.local_saved``); a backward of such a
        route sends ``grad_out`` only (``inputs`` are still ``(x, grad_out)``: ``x`` is sent only if the host
        has dropped the activations)."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            raise RuntimeError("RemoteDispatcher must not be called from its own event loop thread")
        local, remote = [], []
        for i, route in enumerate(routes):
            is_local = route.host == LOCAL if verb == "backward" else self._hosted_here(route.uid)
            (local if is_local else remote).append(i)
        results: list[Optional[torch.Tensor]] = [None] * len(routes)
        future = None
        if remote:
            future = self.loop.submit(self._call_all_remote(verb, [(routes[i], inputs[i]) for i in remote], keep))
        for i in local:
            results[i] = self._call_local(verb, routes[i], inputs[i], keep)
        if future is not None:
            for i, output in zip(remote, future.result(timeout=self.timeout_s + 30)):
                results[i] = output
        return results

    async def _call_all_remote(self, verb: str, calls: list, keep: bool) -> list[Optional[torch.Tensor]]:
        return await asyncio.gather(*(self._call_remote(verb, route, tensors, keep) for route, tensors in calls))

    def _call_local(
        self, verb: str, route: _Route, tensors: tuple[torch.Tensor, ...], keep: bool = False
    ) -> Optional[torch.Tensor]:
        self.stats.local_calls += 1
        try:
            if verb == "forward":
                route.host = LOCAL
                if not keep:
                    return self.local_server.forward_local(route.uid, *tensors)
                output, route.local_saved = self.local_server.forward_local(route.uid, *tensors, save=True)
                return output
            saved, route.local_saved = route.local_saved, None
            return self.local_server.backward_local(route.uid, *tensors, saved=saved)
        except Exception as e:
            route.error = f"{type(e).__name__}: {e}"
            logger.warning(f"local {verb} of {route.uid} failed: {route.error}")
            return None

    async def _call_remote(
        self, verb: str, route: _Route, tensors: tuple[torch.Tensor, ...], keep: bool = False
    ) -> Optional[torch.Tensor]:
        """One expert call: a backward to the host that answered the forward; a forward to the best-placed host
        (cheapest link, then least loaded), hedged to the next one when it is late (``LinkTable.hedge_after``).
        Each attempt has its own deadline from the host's measured latency (``LinkTable.deadline``), all of
        them together at most ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        if verb == "backward":
            if self.bans.banned(route.host):  # found black-holed since its forward: do not wait a deadline again
                route.error = f"host {route.host[-6:]} stopped answering since the forward"
                return None
            hosts = [route.host]
        else:
            self.stats.remote_forward_calls += 1
            hosts = sorted(self._remote_hosts(route.uid), key=self.links.cost)  # stable: least loaded among equals
        if not hosts:
            route.error = "no live host"
            return None
        attempts: dict[asyncio.Task, str] = {}
        encoded: dict[str, list] = {}  # by codec, so that a hedge to a host on the same kind of link reuses it
        pending = list(hosts)
        newest = hosts[0]
        try:
            while pending or attempts:
                if pending and (not attempts or verb == "forward"):
                    newest = pending.pop(0)
                    task = asyncio.ensure_future(self._attempt(verb, route, newest, tensors, keep, encoded, deadline))
                    attempts[task] = newest
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    route.error = route.error or f"no answer within {self.timeout_s}s"
                    return None
                wait_s = min(remaining, self.links.hedge_after(newest)) if pending else remaining
                done, _ = await asyncio.wait(set(attempts), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    host = attempts.pop(finished)
                    result = finished.result()
                    if result is not None:  # the first answer wins; only its host's kept activations are quoted
                        route.host = host
                        if verb == "forward":
                            route.saved = result[1]
                        return result[0]
        finally:
            for task in attempts:
                task.cancel()
        return None

    async def _attempt(self, verb: str, route: _Route, host: str, tensors: tuple[torch.Tensor, ...], keep: bool,
                       encoded: dict, overall_deadline: float) -> Optional[tuple[torch.Tensor, Optional[int]]]:
        """One call of ``route`` at ``host`` within the host's own deadline: (output, the number under which the
        host keeps this forward's activations, if it does), or None (and ``route.error``) on failure. What a
        timeout means is :func:`~swarmtrain.expert_pool.links.classify_timeout`'s: only a host that answered
        nothing since our request left is banned (a black hole or a dead host)."""
        codec = self.links.codec(host, self.codec)
        nbytes = sum(t.numel() * (1 if codec == "blockwise8" else 4) for t in tensors) * 2
        budget_s = min(self.links.deadline(host, nbytes), overall_deadline - time.monotonic())
        started, sent = time.monotonic(), []
        saved = None
        quoted = verb == "backward" and route.saved is not None  # only grad_out travels
        try:
            if quoted:
                output, served_s = await asyncio.wait_for(
                    self._backward_from_saved(host, route, tensors, codec, sent), budget_s)
            else:
                if codec not in encoded:
                    encoded[codec] = [encode_tensor(t, codec) for t in tensors]
                meta = {"codec": codec, "keep": True} if keep else {"codec": codec}
                reply, (output,) = await asyncio.wait_for(
                    self._call_on_session(host, verb, route.uid, meta, encoded[codec], sent), budget_s)
                served_s = reply.get("served_s")
                number = reply.get("saved")
                saved = number if keep and isinstance(number, int) and not isinstance(number, bool) else None
            if output.shape != tensors[0].shape or output.dtype != torch.float32:
                raise ExpertCallError(f"{verb} of {route.uid} returned {list(output.shape)} {output.dtype}", True)
            elapsed = time.monotonic() - started
            # the rate counts float32 bytes (what the layer moves), so that codecs compare on the same scale
            raw = 4 * (sum(t.numel() for t in (tensors[1:] if quoted else tensors)) + output.numel())
            self.links.observe(host, elapsed, raw, served_s if _plausible(served_s, elapsed) else 0.0)
            self.bans.success(host, route.uid)
            return output, saved
        except asyncio.CancelledError:
            raise
        except Exception as e:
            refused = isinstance(e, ExpertCallError) and e.refused
            route.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if isinstance(e, asyncio.TimeoutError):
                route.error = f"no answer from {host[-6:]} within {budget_s:.2f}s"
                session = self._sessions.peek(host)
                verdict = classify_timeout(sent[-1] if sent else None, session.last_heard if session else None)
                if verdict != SILENT:  # still queued in our own uplink, or alive but slow: no ban
                    self.stats.slow += 1
                    logger.info(f"{verb} of {route.uid} at {host[-6:]} is late ({route.error}): {verdict}")
                    return None
                self.stats.timeouts += 1
            ban = self.bans.failure(host, route.uid if refused else None)
            logger.warning(f"{verb} of {route.uid} at {host[-6:]} failed ({route.error}); banned for {ban:.0f}s")
            return None

    async def _backward_from_saved(
        self, host: str, route: _Route, tensors: tuple[torch.Tensor, ...], codec: str, sent: list
    ) -> tuple[torch.Tensor, object]:
        """Backward quoting the host's kept activations: sends ``grad_out`` only; if the host has dropped them
        (expired, evicted, restarted) it says so and the call is repeated with ``x`` (recomputed forward).
        Returns (input gradient, the host's reported compute seconds)."""
        x, grad_out = tensors
        number, route.saved = route.saved, None
        try:
            meta = {"codec": codec, "saved": number}
            reply, (grad,) = await self._call_on_session(
                host, "backward", route.uid, meta, [encode_tensor(grad_out, codec)], sent)
        except ExpertCallError as e:
            if not e.resend:
                raise
            self.stats.resent += 1
            encoded = [encode_tensor(t, codec) for t in (x, grad_out)]
            reply, (grad,) = await self._call_on_session(host, "backward", route.uid, {"codec": codec}, encoded, sent)
        return grad, reply.get("served_s")

    async def _call_on_session(
        self, host: str, verb: str, uid: str, meta: dict, encoded: list, sent: Optional[list] = None
    ) -> tuple[dict, list[torch.Tensor]]:
        """One call on the session to ``host``: (reply metadata, tensors); ``sent`` gets the time it was written."""
        session = await self._sessions.get(host)
        self.stats.bytes_sent += sum(len(proto.buffer) for proto in encoded)
        call = await session.call(verb, uid, meta, encoded, sent)
        self.stats.bytes_received += sum(len(proto.buffer) for proto in call.tensors)
        return _unpack_response(verb, host, call)


class _DispatchFunction(torch.autograd.Function):
    """Autograd glue: forward sends one request per expert, backward one backward request per answered expert.

    Rows cross the wire as float32 CPU tensors: ``x`` (on any device / dtype) is moved once per call, and outputs
    and gradients are moved back once. Gradients are scattered into a ``[N * k, d]`` buffer with ``index_copy_``
    (each (row, choice) pair belongs to one expert) and summed over the k choices of each row: the scatter-add
    without ``index_add_``, whose CPU kernel opens one OpenMP parallel region per index row and stalls for
    milliseconds on a busy 2-core machine.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dispatcher: RemoteDispatcher, routes: list[_Route], k: int, keep: bool):
        x_cpu = x.detach().to("cpu", torch.float32)
        inputs = [(_finite(x_cpu.index_select(0, r.rows), "x"),) for r in routes]
        outputs = dispatcher.run_calls("forward", routes, inputs, keep)
        out = x_cpu.new_zeros(x.shape[0] * k, x.shape[1])
        answered = torch.zeros(x.shape[0] * k, dtype=torch.bool)
        for route, output in zip(routes, outputs):
            dispatcher.stats.forward_calls += 1
            if output is None:
                dispatcher.stats.forward_failures += 1
                dispatcher.stats.last_error = f"forward {route.uid}: {route.error}"
                continue
            out.index_copy_(0, route.positions, output)
            answered[route.positions] = True
        ctx.dispatcher, ctx.k = dispatcher, k
        ctx.routes = [route for route, output in zip(routes, outputs) if output is not None]
        ctx.save_for_backward(x_cpu)
        ctx.x_device, ctx.x_dtype = x.device, x.dtype
        answered = answered.to(x.device)
        ctx.mark_non_differentiable(answered)
        return out.to(x.device, x.dtype), answered

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_answered: Optional[torch.Tensor]):
        (x_cpu,) = ctx.saved_tensors
        dispatcher, routes, (n, d) = ctx.dispatcher, ctx.routes, x_cpu.shape
        grad_pairs = x_cpu.new_zeros(n * ctx.k, d)  # gradient w.r.t. x of each (row, choice) pair
        if routes:
            grad_out = grad_out.detach().to("cpu", torch.float32)
            inputs = [
                (x_cpu.index_select(0, r.rows), _finite(grad_out.index_select(0, r.positions), "grad_out"))
                for r in routes
            ]
            grads = dispatcher.run_calls("backward", routes, inputs)
            for route, grad in zip(routes, grads):
                dispatcher.stats.backward_calls += 1
                if grad is None:
                    dispatcher.stats.backward_failures += 1
                    dispatcher.stats.last_error = f"backward {route.uid}: {route.error}"
                    rows = len(route.rows)
                    logger.warning(f"backward of {route.uid} failed ({route.error}): zero grad for {rows} rows")
                    continue
                grad_pairs.index_copy_(0, route.positions, grad)
        grad_x = grad_pairs.view(n, ctx.k, d).sum(dim=1)
        return grad_x.to(ctx.x_device, ctx.x_dtype), None, None, None, None


def _plausible(served_s, elapsed: float) -> bool:
    """A host's reported compute time is used only if it is a number between 0 and the call's wall time."""
    return (isinstance(served_s, (int, float)) and not isinstance(served_s, bool) and math.isfinite(served_s)
            and 0.0 <= served_s <= elapsed)


def _finite(rows: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse NaN/Inf here (a bug upstream) rather than have hosts refuse them and get banned for it."""
    if not all_finite(rows):
        raise ValueError(f"the expert layer got NaN or Inf in {name}")
    return rows


async def _call(p2p: P2P, peer_id: str, verb: str, messages: list) -> tuple[dict, list[torch.Tensor]]:
    """One call on its own stream (``rpc_forward`` / ``rpc_backward`` / ``rpc_state``)."""
    stub = ExpertServer.get_stub(p2p, PeerID.from_base58(peer_id))
    method = {"forward": stub.rpc_forward, "backward": stub.rpc_backward, "state": stub.rpc_state}[verb]
    stream = await method(_aiter(messages))
    try:
        call = await read_call(stream, whole=False)
    except Exception as e:
        raise ExpertCallError(f"{verb} call to {peer_id[-6:]} failed: {type(e).__name__}: {e}") from e
    finally:
        await stream.aclose()
    return _unpack_response(verb, peer_id, call)


def _unpack_response(verb: str, peer_id: str, call: Call) -> tuple[dict, list[torch.Tensor]]:
    if "error" in call.meta:
        resend = call.meta.get("resend") is True
        message = f"{verb} refused by {peer_id[-6:]}: {call.meta['error']}"
        raise ExpertCallError(message, refused=not resend, resend=resend)
    try:
        return call.meta, [decode_tensor(proto) for proto in call.tensors]
    except Exception as e:
        raise ExpertCallError(f"undecodable {verb} response from {peer_id[-6:]}: {e}", refused=True) from e


async def _aiter(items: list):
    for item in items:
        yield item
