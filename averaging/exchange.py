"""The two sides of one averaging exchange, and the state transfer to a joining peer, over hivemind p2p streams.

Message order is described in :mod:`swarmtrain.averaging.protocol`; the arithmetic is done by
:class:`~swarmtrain.averaging.replica.LocalReplica`. These functions neither choose partners nor keep
statistics beyond bytes: :class:`~swarmtrain.averaging.gossip.GossipAverager` does.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

import numpy as np
import torch
from hivemind.proto import runtime_pb2

from swarmtrain.averaging import protocol, rules
from swarmtrain.averaging.codec import BLOCKSIZES, CODECS, LocalDataError, WireError, decode, encode
from swarmtrain.averaging.protocol import ProtocolError
from swarmtrain.averaging.replica import LocalReplica
from swarmtrain.dht.budget import BULK, INTERACTIVE, UploadBudget
from swarmtrain.dht.streams import drain, linger

MAX_CHUNK_ELEMS = 1 << 24  # a chunk larger than this is refused (64 MiB of float32)


CONTROL_BYTES = 16384  # averaging messages smaller than this are control messages (paced as interactive traffic)


class Rejected(Exception):
    """The partner's tensors were refused (NaN/Inf, wrong sizes, outlier) or it refused ours."""


class Meter:
    """Payload bytes of averaging messages in each direction; outgoing messages of values are paced by the
    peer's upload budget as bulk traffic (``paced``), so that expert calls keep the uplink's head room."""

    def __init__(self, budget: Optional[UploadBudget] = None):
        self.sent = self.received = 0
        self.budget = budget or UploadBudget(None)

    def out(self, message):
        self.sent += message.ByteSize()
        return message

    async def paced(self, message):
        """``out`` after waiting for this message's turn in the upload budget: messages of values are bulk,
        small control messages (accept, commit, done: the partner waits on them) go as interactive traffic."""
        size = message.ByteSize()
        await self.budget.take(size, BULK if size >= CONTROL_BYTES else INTERACTIVE)
        return self.out(message)

    def inp(self, message):
        self.received += message.ByteSize()
        return message


@dataclass
class Outcome:
    """How a served exchange ended: "ok", "rejected" (bad data), "failed" (broke off), "local" (our own values
    are not finite), "stale" or "aborted"."""

    result: str = "failed"
    error: str = "the initiator went away mid-exchange"
    weight: float = 1.0  # the initiator's push-sum weight
    committing: bool = False  # the commit arrived: the exchange must not be cancelled any more
    agree: bool = True  # no chunk of values came 8-bit: the pair agrees afterwards (up to 8-bit differences)
    relative: bool = False  # values came as 8-bit differences from the reference we share with the initiator


async def initiate(replica: LocalReplica, stream_factory: Callable, meter: Meter, group: str,
                   local_step: Callable[[], int], unchanged_if: Optional[tuple[int, int]] = None,
                   partner: Optional[dict] = None, peer: str = "") -> str:
    """Run one exchange as the initiator: "ok", "busy" or "stale"; raises Rejected/ProtocolError/WireError on
    bad data, LocalDataError if our own values are not finite, TimeoutError when the partner stalls past
    ``spec.timeout_s`` and ConnectionError (or another p2p error) when it goes away. Parameters change only on
    "ok". Once the partner's "done" has arrived our own half is scheduled (shielded) before anything else can
    happen, so no timeout or shutdown can separate the two halves of an exchange (only a "done" lost on the
    wire can). ``partner`` receives the partner's ``state`` (exchanges applied, local step) from its "accept"
    and whether the pair ``agree`` s afterwards, and ``relative`` when our 8-bit values went as differences from
    the reference shared with ``peer`` (see :mod:`~swarmtrain.averaging.references`)."""
    outbox: asyncio.Queue = asyncio.Queue()
    spec = replica.spec
    deadline = asyncio.get_running_loop().time() + spec.timeout_s
    ref_token = replica.references.token(peer) if peer else None
    hello = protocol.hello(group, replica.numel, replica.layout, spec.codec, spec.blocksize, spec.chunk_elems,
                           replica.weight, (replica.version, local_step()), unchanged_if,
                           sample=spec.codec == "8bit" and spec.adaptive_precision, ref=ref_token)

    async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield await meter.paced(hello)
        while (message := await outbox.get()) is not None:
            yield await meter.paced(message)

    # a partner answers the hello at once or not at all (a black-holed host): a short deadline for the handshake
    handshake = min(deadline, asyncio.get_running_loop().time() + spec.connect_timeout_s)
    stream = await asyncio.wait_for(stream_factory(requests()), handshake - asyncio.get_running_loop().time())
    sender: Optional[asyncio.Task] = None
    applied = False
    stage = "waiting for accept"
    try:
        kind, meta, _ = protocol.parse(await _next(stream, meter, handshake), ("accept", "refuse"))
        if kind == "refuse":
            if meta.get("reason") in ("busy", "banned", "unchanged"):
                return "unchanged" if meta.get("reason") == "unchanged" else "busy"
            raise Rejected(f"partner refused: {meta.get('reason')}")
        weight_p = protocol.field(meta, "weight", float, low=1e-9, high=1e9)
        state = meta.get("state")
        if partner is not None and isinstance(state, list) and len(state) == 2:
            partner["state"] = (int(state[0]), int(state[1]))
        reference = None
        if ref_token is not None and meta.get("ref") is not True:  # the partner holds no reference with this token
            replica.references.drop(peer)
        elif ref_token is not None:
            reference = replica.references.get(peer, ref_token)
            if reference is not None and not await replica.call(replica.worth_relative, reference):
                reference = None
        sample = meta.get("sample")
        partner_sample = _sample_tensor(sample) if isinstance(sample, bytes) else torch.empty(0)
        precise = reference is None and await replica.call(replica.precise_values, partner_sample)
        if partner is not None:  # lossless enough that the pair agrees afterwards (else re-averaging helps)
            partner["agree"] = spec.codec != "8bit" or precise or reference is not None
            partner["relative"] = reference is not None
        step0 = local_step()
        snapshot = torch.empty(replica.numel) if replica.needs_snapshot else None
        sent: dict[int, torch.Tensor] = {}
        sender = asyncio.create_task(_send_values(replica, outbox, snapshot, precise, sent, reference))
        stage = "waiting for answers"
        try:
            received = await _receive_answers(replica, stream, meter, deadline, sent)
            own_norm, sent_norm, q8_err = await sender
        except Exception:
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                raise sender.exception() from None  # e.g. our own values are not finite: the partner got an abort
            raise
        tau = max(0, local_step() - step0)
        distance = float(received.norm())
        factor, why_not = replica.commit_factor(tau, distance, own_norm, sent_norm)
        if why_not is not None:
            outbox.put_nowait(protocol.request("abort", reason=why_not))
            outbox.put_nowait(None)
            await drain(stream, spec.timeout_s)  # let the partner read the abort before the stream closes
            if why_not == "stale":
                return "stale"
            raise Rejected(why_not)
        new_token = random.getrandbits(62) if replica.references.max_partners and peer else None
        outbox.put_nowait(protocol.request("commit", factor=factor, ref=new_token))
        stage = "waiting for done"
        kind, meta, _ = protocol.parse(await _next(stream, meter, deadline), ("done", "refuse"))
        # end our side only now: writing to a stream the partner already closed would reset it, and a reset
        # can drop its "done" before we read it
        outbox.put_nowait(None)
        if kind == "refuse":
            raise Rejected(f"partner refused to commit: {meta.get('reason')}")
        applied = True
        replica.after_exchange(True, own_norm, q8_err)
        await asyncio.shield(replica.call(replica.apply_mixing, received, weight_p, factor, 1.0, snapshot))
        if new_token is not None:  # the partner stored the same before its "done"
            await asyncio.shield(replica.call(replica.remember_pair, peer, new_token, sent, received))
        return "ok"
    except (asyncio.TimeoutError, ConnectionError, OSError) as e:
        raise type(e)(f"{e or type(e).__name__} ({stage})") from None
    finally:
        if not applied:
            replica.after_exchange(False)
        if sender is not None and not sender.done():
            sender.cancel()
        with contextlib.suppress(Exception):
            await stream.aclose()


async def serve(replica: LocalReplica, hello: dict, requests: AsyncIterator, meter: Meter, outcome: Outcome,
                still_ours: Callable[[], bool], local_step: int = 0,
                remote: str = "") -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Serve one exchange as the partner (of the initiator ``remote``) after an accepted ``hello``; the end is
    recorded in ``outcome``.

    ``still_ours()`` turns False when the averager gave up on this exchange (it ran past the timeout): then
    nothing is applied. Bad data ends the exchange with a ``refuse`` message and leaves parameters untouched.
    """
    blocksize = hello["blocksize"]
    segments = hello["segments"]
    timeout = replica.spec.timeout_s
    outcome.weight = hello["weight"]
    try:
        reference = None
        if remote and isinstance(hello.get("ref"), int) and not isinstance(hello.get("ref"), bool):
            reference = replica.references.get(remote, hello["ref"])  # a mismatched token drops ours
        sample = (await replica.call(replica.sample)).numpy().tobytes() if hello.get("sample", True) else None
        yield protocol.response("accept", weight=replica.weight, state=[replica.version, local_step], sample=sample,
                                ref=reference is not None)
        received = torch.empty(replica.numel)
        values = torch.empty(replica.numel) if replica.references.max_partners and remote else None
        snapshot = torch.empty(replica.numel) if replica.needs_snapshot else None
        own_sq = their_sq = 0.0
        for segment in segments:
            message = meter.inp(await asyncio.wait_for(anext(requests), timeout))
            kind, meta, tensor = protocol.parse(message, ("chunk", "abort"))
            if kind == "abort":
                outcome.result, outcome.error = "aborted", str(meta.get("reason"))
                return
            if protocol.field(meta, "o", int) != segment.lo or tensor is None:
                raise ProtocolError(f"expected the chunk at offset {segment.lo}")
            relative = meta.get("r") is True
            if relative and reference is None:
                raise ProtocolError(f"chunk at {segment.lo} is relative to a reference we do not share")
            if tensor.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT and not relative:
                outcome.agree = False
            reply, mode, x, d, x_sq, a_sq, a = await replica.call(replica.answer_chunk, tensor, segment, blocksize,
                                                                  reference if relative else None)
            if snapshot is not None:
                snapshot[segment.lo : segment.hi] = x
            if values is not None:
                values[segment.lo : segment.hi] = a
            outcome.relative = outcome.relative or relative
            own_sq, their_sq = own_sq + x_sq, their_sq + a_sq
            received[segment.lo : segment.hi] = d
            yield protocol.response("chunk", reply, o=segment.lo, m=mode)
        message = meter.inp(await asyncio.wait_for(anext(requests), timeout))
        kind, meta, _ = protocol.parse(message, ("commit", "abort"))
        if kind == "abort":
            outcome.result = "stale" if meta.get("reason") == "stale" else "aborted"
            outcome.error = str(meta.get("reason"))
            return
        factor = protocol.field(meta, "factor", float, low=0.0, high=1.0)
        distance = float(received.norm())
        if rules.is_outlier(distance, own_sq**0.5, their_sq**0.5, replica.spec.max_rel_distance):
            raise Rejected(f"outlier: initiator is {distance:.3g} away, our norm is {own_sq ** 0.5:.3g}")
        if not still_ours():
            outcome.result, outcome.error = "failed", "timed out before the commit"
            return
        new_token = meta.get("ref")
        outcome.committing = True  # from here on nothing may stop us between applying and saying "done"
        await asyncio.shield(replica.call(replica.apply_mixing, received, hello["weight"], factor, -1.0, snapshot))
        if values is not None and isinstance(new_token, int) and not isinstance(new_token, bool):
            await asyncio.shield(replica.call(replica.references.store, remote, new_token, values, received))
        outcome.result = "ok"
        yield protocol.response("done")
        await drain(requests, timeout)
    except LocalDataError as e:
        outcome.result, outcome.error = "local", str(e)
        yield protocol.response("refuse", reason="the partner's own parameters are not finite")
        await drain(requests, timeout)
    except (ProtocolError, WireError, Rejected) as e:
        outcome.result, outcome.error = "rejected", str(e)
        yield protocol.response("refuse", reason=str(e)[:200])
        await drain(requests, timeout)
    except (asyncio.TimeoutError, StopAsyncIteration, ConnectionError) as e:
        outcome.result, outcome.error = "failed", f"initiator went silent ({type(e).__name__})"
    except RuntimeError as e:  # e.g. we are shutting down: our thread pool is closed
        outcome.result, outcome.error = "failed", f"{type(e).__name__}: {e}"


def check_hello(replica: LocalReplica, group: str, message) -> dict:
    """The fields of a valid ``hello`` for this replica and group; ProtocolError otherwise."""
    _, meta, _ = protocol.parse(message, ("hello",))
    if meta.get("v") != protocol.PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {meta.get('v')!r}, we speak {protocol.PROTOCOL_VERSION}")
    if meta.get("group") != group:
        raise ProtocolError(f"group {meta.get('group')!r} is not {group!r}")
    check_layout(replica, meta)
    if meta.get("codec") not in CODECS or meta.get("blocksize") not in BLOCKSIZES:
        raise ProtocolError(f"unsupported codec {meta.get('codec')!r} / blocksize {meta.get('blocksize')!r}")
    chunk_elems = protocol.field(meta, "chunk_elems", int, low=meta["blocksize"], high=MAX_CHUNK_ELEMS)
    meta["segments"] = replica.plan(meta["codec"], chunk_elems, meta["blocksize"])
    meta["weight"] = protocol.field(meta, "weight", float, low=1e-9, high=1e9)
    return meta


def check_layout(replica: LocalReplica, meta: dict) -> None:
    if meta.get("numel") != replica.numel or meta.get("layout") != replica.layout:
        raise ProtocolError(
            f"parameter layout differs: they have {meta.get('numel')!r} elements (layout {meta.get('layout')!r}), "
            f"we have {replica.numel} (layout {replica.layout})"
        )


async def serve_state(replica: LocalReplica, request, meter: Meter) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Stream our parameters (float32, one consistent snapshot) to a joining peer."""
    try:
        _, meta, _ = protocol.parse(request, ("state",))
        check_layout(replica, meta)
    except ProtocolError as e:
        yield meter.out(protocol.response("refuse", reason=str(e)[:200]))
        await linger(timeout=replica.spec.timeout_s)
        return
    snapshot = await replica.call(replica.snapshot)
    yield meter.out(protocol.response("accept", numel=replica.numel))
    step = replica.spec.chunk_elems
    for lo in range(0, replica.numel, step):
        message, _ = encode(snapshot[lo : lo + step], "none")
        yield await meter.paced(protocol.response("chunk", message, o=lo))
    yield meter.out(protocol.response("done"))
    await linger(timeout=replica.spec.timeout_s)  # until the joining peer has read everything and closes


async def fetch_state(replica: LocalReplica, stream_factory: Callable, meter: Meter, group: str) -> torch.Tensor:
    """Download a peer's parameters: a float32 vector of ``replica.numel`` finite values, or an exception."""
    request = protocol.request("state", group=group, numel=replica.numel, layout=replica.layout)
    stream = await stream_factory(meter.out(request))
    try:
        kind, meta, _ = protocol.parse(await _next(stream, meter), ("accept", "refuse"))
        if kind == "refuse":
            raise Rejected(f"peer refused to send its state: {meta.get('reason')}")
        state = torch.empty(replica.numel)
        offset = 0
        while True:
            kind, meta, tensor = protocol.parse(await _next(stream, meter), ("chunk", "done"))
            if kind == "done":
                break
            if protocol.field(meta, "o", int) != offset or tensor is None or len(tensor.size) != 1:
                raise ProtocolError(f"expected a state chunk at offset {offset}")
            n = int(tensor.size[0])
            if not 0 < n <= min(replica.numel - offset, MAX_CHUNK_ELEMS):
                raise ProtocolError(f"state chunk of {n} elements at offset {offset} does not fit {replica.numel}")
            values, _ = await replica.call(decode, tensor, n, replica.spec.blocksize)
            state[offset : offset + n] = values
            offset += n
        if offset != replica.numel:
            raise ProtocolError(f"state ended after {offset} of {replica.numel} elements")
        return state
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def _receive_answers(replica: LocalReplica, stream, meter: Meter, deadline: float,
                           sent: dict[int, torch.Tensor]) -> torch.Tensor:
    """The moves ``D ~ x_p - A`` the partner answered (decoded ``B``, or its decoded values minus the ``A`` we
    ``sent``), in segment order: exactly what the partner applies too."""
    received = torch.empty(replica.numel)
    for segment in replica.segments:
        kind, meta, tensor = protocol.parse(await _next(stream, meter, deadline), ("chunk", "refuse"))
        if kind == "refuse":
            raise Rejected(f"partner refused mid-exchange: {meta.get('reason')}")
        if protocol.field(meta, "o", int) != segment.lo or tensor is None:
            raise ProtocolError(f"expected the chunk at offset {segment.lo}")
        mode = meta.get("m", "d")
        if mode not in ("d", "v"):
            raise ProtocolError(f"unknown answer mode {mode!r}")
        values, codec = await replica.call(decode, tensor, segment.hi - segment.lo, replica.spec.blocksize,
                                           received[segment.lo : segment.hi])
        if codec != segment.codec:
            raise ProtocolError(f"chunk at {segment.lo} encoded as {codec}, expected {segment.codec}")
        if mode == "v":
            values.sub_(sent[segment.lo])
    return received


async def _send_values(replica: LocalReplica, outbox: asyncio.Queue, snapshot: Optional[torch.Tensor],
                       precise: bool, sent: dict[int, torch.Tensor], reference: Optional[torch.Tensor] = None):
    """Encode our values segment by segment into ``outbox`` (keeping what the partner decodes in ``sent``; 8-bit
    segments as differences from ``reference`` if given); returns (||x||, ||A||, 8-bit error or None)."""
    own_sq = sent_sq = 0.0
    q8_sq, any_q8 = 0.0, False
    for segment in replica.segments:
        relative = reference is not None and segment.codec == "8bit"
        codec = "8bit" if relative else replica.value_codec(segment, precise)
        try:
            message, x, sent[segment.lo], x_sq, a_sq, err_sq = await replica.call(
                replica.encode_own, segment, codec, reference if relative else None
            )
        except LocalDataError as e:
            outbox.put_nowait(protocol.request("abort", reason="the initiator's parameters are not finite"))
            outbox.put_nowait(None)
            raise e
        if snapshot is not None:
            snapshot[segment.lo : segment.hi] = x
        own_sq, sent_sq = own_sq + x_sq, sent_sq + a_sq
        if codec == "8bit" and not relative:
            q8_sq, any_q8 = q8_sq + err_sq, True
        fields = {"o": segment.lo, "r": True} if relative else {"o": segment.lo}
        outbox.put_nowait(protocol.request("chunk", message, **fields))
    return own_sq**0.5, sent_sq**0.5, (q8_sq**0.5 if any_q8 else None)


async def _next(stream, meter: Meter, deadline: Optional[float] = None):
    """The next message of ``stream`` (before the loop time ``deadline``, if given)."""
    try:
        if deadline is None:
            message = await anext(stream)
        else:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                raise asyncio.TimeoutError()
            message = await asyncio.wait_for(anext(stream), timeout)
    except StopAsyncIteration:
        raise ConnectionError("the partner closed the stream") from None
    return meter.inp(message)


def _sample_tensor(data: bytes) -> torch.Tensor:
    """The partner's sampled values (float32 bytes); an empty tensor if malformed (then no estimate is made)."""
    if len(data) % 4:
        return torch.empty(0)
    values = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
    return values if bool(torch.isfinite(values).all()) else torch.empty(0)
