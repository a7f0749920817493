"""Serving this peer's experts to the swarm over the peer's own libp2p handle.

Why not hivemind.moe's ``Server``: it runs a ConnectionHandler *process* per handler, a Runtime process and
pipes between them, and its clients (``RemoteMixtureOfExperts``) issue one RPC per (sample, expert) pair. On a
2-core volunteer box we want one process per peer: :class:`ExpertServer` registers three ``rpc_*`` stream handlers
on the :class:`~swarmtrain.dht.node.SwarmNode`'s p2p replica, runs compute on a small thread pool inside the peer
process, batches all rows for one expert into one call (:mod:`~swarmtrain.expert_pool.batching`), and validates
every request (uid, shape, dtype, NaN/Inf, size, decodability) before anything reaches an optimizer.

Network surface (grep ``rpc_``), all streams of ``runtime_pb2.ExpertRequest`` -> ``ExpertResponse``
(framing in :mod:`~swarmtrain.expert_pool.wire`):

* ``rpc_forward``: tensors ``[x]`` -> ``[expert(x)]`` computed without autograd;
* ``rpc_backward``: tensors ``[x, grad_out]`` -> ``[grad_x]``; recomputes the forward with autograd and applies
  one optimizer step of the expert per processed batch, applied right after its gradients are sent. A forward
  call with ``metadata["keep"] = True`` (the caller will run backward) makes the server keep its activations
  (:mod:`~swarmtrain.expert_pool.activations`) and answer with ``metadata["saved"] = <number>``; a backward quoting
  that number sends ``[grad_out]`` only and is computed without recomputing the forward. If the activations are
  gone (expired, evicted, server restarted) the refusal carries ``metadata["resend"] = True`` and the caller sends
  ``[x, grad_out]``;
* ``rpc_session``: a long-lived stream per caller carrying many forward/backward calls, each tagged with an id
  (``metadata["id"]``, ``metadata["verb"]``) and answered as soon as it is done, in any order. Opening a libp2p
  stream per call costs ~1.3 ms of CPU across both daemons and both processes; a call on an open session
  ~0.13 ms, which is what :class:`~swarmtrain.expert_pool.client.RemoteDispatcher` uses;
* ``rpc_state``: the expert's parameters (to start hosting an expert someone else has been training).

A refused request gets a response whose metadata is ``{"error": "<why>"}``; the server goes on serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import AsyncIterator, Mapping, Optional, Sequence

import torch
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarmtrain.dht.budget import BULK, INTERACTIVE, UploadBudget
from swarmtrain.dht.node import LoopThread
from swarmtrain.dht.records import ExpertLoad, Manifest
from swarmtrain.dht.streams import linger
from swarmtrain.dht.uids import parse_uid
from swarmtrain.expert_pool.backend import ExpertBackend
from swarmtrain.expert_pool.activations import DEFAULT_MAX_BYTES, ActivationCache
from swarmtrain.expert_pool.batching import BatchQueue, Verb
from swarmtrain.expert_pool.codec import WireError, all_finite, check_codec, decode_tensor, encode_tensor
from swarmtrain.expert_pool.expert import ExpertFFN, make_expert
from swarmtrain.expert_pool.wire import (
    DEFAULT_CHUNK_BYTES,
    Call,
    error_response,
    iter_calls,
    pack_response,
    read_call,
)

logger = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 5.0  # how long a finished single-call stream stays open for its caller (dht/streams.py)
MAX_SESSION_CALLS = 64  # calls in flight on one session; the stream is not read further until some complete
_INPUTS: dict[str, tuple[str, ...]] = {"forward": ("x",), "backward": ("x", "grad_out")}


class ExpertRequestError(ValueError):
    """A request was refused (unknown expert, bad shape/dtype/values, too large); the message says why."""


class ExpertServer(ServicerBase):
    """Serves this peer's experts over its p2p: ``rpc_forward``, ``rpc_backward``, ``rpc_session``, ``rpc_state``.

    :param p2p: the peer's hivemind P2P replica (``SwarmNode.p2p``)
    :param loop: the loop thread the p2p replica lives on (``SwarmNode.loop``)
    :param manifest: the run manifest: expert sizes, seed, optimizer, batch limits
    :param max_rows: most rows one request may carry (default ``manifest.expert_pool.max_batch_rows``)
    :param handler_threads: threads computing expert batches (different experts run in parallel)
    :param max_batch_rows: most rows merged into one server-side batch (default: ``max_rows``)
    :param max_wait_s: how long a non-full batch waits for more callers (default 0: no added latency)
    :param activation_cache_bytes: memory for activations kept between callers' forward and backward calls
      (kept for ``2 x expert_pool.timeout_s``, at least 30 s; 0 disables it: backward recomputes the forward)

    Example::

        server = ExpertServer(node.p2p, node.loop, manifest)
        server.start()
        server.add_expert("text.0.1")
        ...
        server.shutdown()
    """

    def __init__(
        self,
        p2p: P2P,
        loop: LoopThread,
        manifest: Manifest,
        *,
        max_rows: Optional[int] = None,
        handler_threads: int = 2,
        max_batch_rows: Optional[int] = None,
        max_wait_s: float = 0.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        activation_cache_bytes: int = DEFAULT_MAX_BYTES,
        budget: Optional[UploadBudget] = None,
    ):
        self.p2p, self.loop, self.manifest = p2p, loop, manifest
        self.budget = budget or UploadBudget(None)  # answers are interactive traffic
        self.hidden = manifest.model.hidden
        self.max_rows = int(max_rows or manifest.expert_pool.max_batch_rows)
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_batch_rows = int(max_batch_rows or self.max_rows)
        self.max_wait_s = float(max_wait_s)
        self.chunk_bytes = chunk_bytes
        self.rejected = 0  # requests refused by validation
        self.activations = ActivationCache(activation_cache_bytes, ttl_s=max(2 * manifest.expert_pool.timeout_s, 30))
        self._known_uids = frozenset(manifest.expert_uids())
        self._backends: dict[str, ExpertBackend] = {}
        self._queues: dict[str, BatchQueue] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(handler_threads, thread_name_prefix="expert-compute")
        self._started = False

    # ---- lifecycle and hosting -------------------------------------------------------------------------------

    def start(self) -> None:
        """Register the ``rpc_*`` handlers on the peer's p2p (runs on the loop thread)."""
        if not self._started:
            self.loop.run(self.add_p2p_handlers(self.p2p), timeout=30)
            self._started = True

    def add_expert(self, uid: str, module: Optional[ExpertFFN] = None) -> None:
        """Host expert ``uid`` (a fresh ``make_expert(uid, ..., manifest.seed)`` when ``module`` is None)."""
        parse_uid(uid)
        if uid not in self._known_uids:
            raise ValueError(f"expert {uid!r} is not part of run {self.manifest.run_id!r}")
        if uid in self._backends:
            raise ValueError(f"expert {uid!r} is already hosted here")
        spec = self.manifest.model
        if module is None:
            module = make_expert(uid, spec.hidden, spec.expert_ffn, self.manifest.seed)
        if module.hidden != spec.hidden:
            raise ValueError(f"expert {uid!r} has hidden size {module.hidden}, the run uses {spec.hidden}")
        backend = ExpertBackend(uid, module, self.manifest.optimizer)
        self._queues[uid] = BatchQueue(self._compute_fn(backend), self._executor, self.max_batch_rows, self.max_wait_s,
                                       after_backward=backend.step)
        self._backends[uid] = backend

    def remove_expert(self, uid: str) -> None:
        """Stop hosting ``uid``; calls already queued still complete."""
        if self._backends.pop(uid, None) is None:
            raise KeyError(f"expert {uid!r} is not hosted here")
        self._queues.pop(uid, None)
        self.activations.drop(uid)

    def hosted(self) -> dict[str, ExpertLoad]:
        """Experts served here and their load (rows/s EMA, calls, optimizer steps)."""
        return {uid: backend.load() for uid, backend in list(self._backends.items())}

    def is_hosted(self, uid: str) -> bool:
        """Whether expert ``uid`` is served here (cheap; for routing decisions)."""
        return uid in self._backends

    def module(self, uid: str) -> ExpertFFN:
        """The live module of a hosted expert (for checkpointing; do not train it from outside)."""
        return self._backend(uid).module

    def shutdown(self) -> None:
        """Unregister the handlers and stop the thread pool."""
        if self._started:
            try:
                self.loop.run(self.remove_p2p_handlers(self.p2p), timeout=10)
            except Exception as e:  # the daemon may already be gone
                logger.debug(f"removing expert handlers: {e}")
            self._started = False
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- in-process calls (same validation and compute as the RPCs, no network) ------------------------------

    def forward_local(self, uid: str, x: torch.Tensor, save: bool = False):
        """Expert outputs for rows ``x [rows, hidden]`` (no autograd), as ``rpc_forward`` computes them; with
        ``save``, ``(outputs, saved)`` where ``saved`` is what :meth:`backward_local` can start from."""
        backend = self._backend(uid)
        (x,) = self._check_rows(backend, (x,), ("x",))
        if save:
            return backend.forward_saving(x)
        return backend.forward(x)

    def backward_local(
        self, uid: str, x: torch.Tensor, grad_out: torch.Tensor, saved: Optional[tuple[torch.Tensor, ...]] = None
    ) -> torch.Tensor:
        """Gradient w.r.t. ``x`` and one optimizer step, as ``rpc_backward`` computes them (from ``saved`` of
        :meth:`forward_local` when given, else by recomputing the forward)."""
        backend = self._backend(uid)
        x, grad_out = self._check_rows(backend, (x, grad_out), ("x", "grad_out"))
        if saved is not None:
            return backend.backward_saved(saved, grad_out)
        return backend.backward(x, grad_out)

    def state_dict(self, uid: str) -> dict[str, torch.Tensor]:
        """A copy of expert ``uid``'s parameters."""
        return self._backend(uid).state_dict()

    def expert_lock(self, uid: str) -> threading.Lock:
        """The lock held around expert ``uid``'s optimizer steps (for an averager of its replicas)."""
        return self._backend(uid).lock

    def load_state_dict(self, uid: str, state: Mapping[str, torch.Tensor]) -> None:
        """Replace expert ``uid``'s parameters (e.g. fetched from another host with ``fetch_expert_state``)."""
        self._backend(uid).load_state_dict(state)

    # ---- RPC handlers ----------------------------------------------------------------------------------------

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Forward pass of one expert on a batch of rows (one call per stream)."""
        for message in await self._serve_one("forward", requests, context):
            yield message
        await linger(requests, DRAIN_TIMEOUT_S)

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Backward pass (grad w.r.t. inputs) of one expert, then one optimizer step of it (one call per stream)."""
        for message in await self._serve_one("backward", requests, context):
            yield message
        await linger(requests, DRAIN_TIMEOUT_S)

    async def rpc_session(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Many forward/backward calls on one stream; each response carries its call's ``id``.

        Back-pressure: at most ``MAX_SESSION_CALLS`` calls are in flight per session and responses wait in a short
        queue, so a caller that sends without reading stalls its own stream instead of filling our memory.
        """
        outgoing: asyncio.Queue = asyncio.Queue(maxsize=4 * MAX_SESSION_CALLS)
        tasks: set[asyncio.Task] = set()

        async def serve(call: Call) -> None:
            call_id, verb = call.meta.get("id"), call.meta.get("verb")
            tag = {"id": call_id if isinstance(call_id, int) and not isinstance(call_id, bool) else None}
            if call.error is not None:
                messages = self._refuse(str(verb), call.error, context, tag)
            elif verb not in _INPUTS:
                messages = self._refuse(str(verb), f"unknown verb {verb!r}: expected forward or backward", context, tag)
            else:
                messages = await self._process(verb, call, context, tag)
            for message in messages:
                await outgoing.put(message)

        async def read() -> None:
            try:
                async for call in iter_calls(requests, max_bytes=self._max_request_bytes(2)):
                    while len(tasks) >= MAX_SESSION_CALLS:
                        await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                    task = asyncio.create_task(serve(call))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except WireError as e:  # the stream cannot be split into calls any more: answer what we have, close
                logger.info(f"closing expert session of {context.remote_id}: {e}")
            finally:
                if tasks:
                    await asyncio.wait(set(tasks))
                await outgoing.put(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await outgoing.get()) is not None:
                await self.budget.take(message.ByteSize(), INTERACTIVE)
                yield message
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def rpc_state(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Parameters of one hosted expert: tensors in the order of ``metadata["names"]``."""
        try:
            call = await read_call(requests, max_bytes=0)
            state = self._backend(call.uid).state_dict()
            names = sorted(state)
            messages = pack_response({"names": names}, [encode_tensor(state[n]) for n in names], self.chunk_bytes)
        except (WireError, ExpertRequestError) as e:
            messages = error_response(str(e))
        for message in messages:
            await self.budget.take(message.ByteSize(), BULK)
            yield message
        await linger(requests, DRAIN_TIMEOUT_S)

    # ---- helpers ---------------------------------------------------------------------------------------------

    async def _serve_one(
        self, verb: Verb, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> list[runtime_pb2.ExpertResponse]:
        try:
            call = await read_call(requests, max_bytes=self._max_request_bytes(len(_INPUTS[verb])))
        except WireError as e:
            return self._refuse(verb, str(e), context)
        return await self._process(verb, call, context)

    async def _process(
        self, verb: Verb, call: Call, context: P2PContext, tag: Optional[dict] = None
    ) -> list[runtime_pb2.ExpertResponse]:
        """Validate one call, run it through the expert's batch queue, encode the answer (or the refusal);
        ``tag`` is added to the response metadata (the session call id)."""
        tag = tag or {}
        caller = str(context.remote_id)
        started = time.perf_counter()
        try:
            backend = self._backend(call.uid)
            codec = check_codec(call.meta.get("codec", "none"))
            saved_number = call.meta.get("saved") if verb == "backward" else None
            names = ("grad_out",) if saved_number is not None else _INPUTS[verb]
            if len(call.tensors) != len(names):
                raise ExpertRequestError(
                    f"{verb} of {call.uid} takes tensors {list(names)}, got {len(call.tensors)} tensors"
                )
            limit = self.max_rows * self.hidden
            tensors = self._check_rows(backend, [decode_tensor(p, max_elements=limit) for p in call.tensors], names)
            queue = self._queues.get(call.uid)
            if queue is None:
                raise ExpertRequestError(f"expert {call.uid!r} is not hosted by this peer")
            meta = dict(tag)
            if saved_number is not None:
                saved = self._take_saved(caller, saved_number, call.uid, tensors[0].shape[0])
                if saved is None:  # not a bad request: the caller resends x (no ban, not counted as rejected)
                    reason = f"the activations of forward call {saved_number} of {call.uid} are gone: send x again"
                    return error_response(reason, **tag, resend=True)
                output = await queue.submit("backward_saved", (*saved.tensors, tensors[0]))
            elif verb == "forward":
                output, pre = await queue.submit("forward", tensors)
                if call.meta.get("keep") is True:
                    number = self.activations.put(caller, call.uid, (tensors[0], pre))
                    if number is not None:
                        meta["saved"] = number
            else:
                output = await queue.submit(verb, tensors)
            meta["version"] = backend.steps
            meta["served_s"] = round(time.perf_counter() - started, 6)  # lets the caller tell compute from the link
            return pack_response(meta, [encode_tensor(output, codec)], self.chunk_bytes)
        except (WireError, ExpertRequestError) as e:
            return self._refuse(verb, str(e), context, tag)
        except Exception as e:  # a bug or resource error in compute: tell the caller, keep serving
            logger.warning(f"{verb} request from {context.remote_id} failed", exc_info=True)
            return error_response(f"{verb} failed on the server: {type(e).__name__}: {e}", **tag)

    def _take_saved(self, caller: str, number, uid: str, rows: int):
        """The kept activations a backward quotes (None if gone); a malformed or mismatched quote is refused."""
        if not isinstance(number, int) or isinstance(number, bool):
            raise ExpertRequestError(f"metadata 'saved' must be an integer, got {number!r}")
        saved = self.activations.take(caller, number, uid)
        if saved is not None and saved.rows != rows:
            raise ExpertRequestError(f"grad_out has {rows} rows but forward call {number} of {uid} had {saved.rows}")
        return saved

    def _refuse(
        self, verb: str, reason: str, context: P2PContext, tag: Optional[dict] = None
    ) -> list[runtime_pb2.ExpertResponse]:
        self.rejected += 1
        logger.info(f"refused {verb} request from {context.remote_id}: {reason}")
        return error_response(reason, **(tag or {}))

    def _backend(self, uid: str) -> ExpertBackend:
        backend = self._backends.get(uid)
        if backend is None:
            raise ExpertRequestError(f"expert {uid!r} is not hosted by this peer")
        return backend

    def _check_rows(
        self, backend: ExpertBackend, tensors: Sequence[torch.Tensor], names: Sequence[str]
    ) -> tuple[torch.Tensor, ...]:
        """Every tensor float32 ``[rows, hidden]``, 1 <= rows <= max_rows, equal rows, all values finite."""
        for name, tensor in zip(names, tensors):
            if not isinstance(tensor, torch.Tensor):
                raise ExpertRequestError(f"{name} must be a tensor, got {type(tensor).__name__}")
            if tensor.dtype != torch.float32:
                raise ExpertRequestError(f"{name} of {backend.uid} must be float32, got {tensor.dtype}")
            if tensor.ndim != 2 or tensor.shape[1] != backend.hidden:
                raise ExpertRequestError(
                    f"{name} of {backend.uid} must have shape [rows, {backend.hidden}], got {list(tensor.shape)}"
                )
            if not 1 <= tensor.shape[0] <= self.max_rows:
                raise ExpertRequestError(f"{name} has {tensor.shape[0]} rows; this server takes 1..{self.max_rows}")
            if tensor.shape[0] != tensors[0].shape[0]:
                raise ExpertRequestError(f"{name} has {tensor.shape[0]} rows but {names[0]} has {tensors[0].shape[0]}")
            if not all_finite(tensor):
                raise ExpertRequestError(f"{name} of {backend.uid} contains NaN or Inf")
        return tuple(tensor.detach().cpu() for tensor in tensors)

    def _max_request_bytes(self, n_tensors: int) -> int:
        return n_tensors * (4 * self.max_rows * self.hidden + 4096)

    @staticmethod
    def _compute_fn(backend: ExpertBackend):
        def compute(verb: Verb, tensors: tuple[torch.Tensor, ...]):
            # the optimizer step follows once the gradients are on their way (BatchQueue's after_backward)
            if verb == "forward":  # (outputs, pre-activations): keeping the latter costs no extra compute
                out, (_, pre) = backend.forward_saving(tensors[0])
                return out, pre
            if verb == "backward_saved":
                x, pre, grad_out = tensors
                return backend.backward_saved((x, pre), grad_out, step=False)
            return backend.backward(*tensors, step=False)

        return compute
