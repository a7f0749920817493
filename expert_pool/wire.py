"""Message framing of the expert pool's RPCs: a call is a run of ExpertRequest / ExpertResponse messages.

A call carries a msgpack dict (``metadata`` of its first message) and a list of tensors encoded by
:mod:`swarmtrain.expert_pool.codec`. Tensors are split into chunks of at most ``chunk_bytes`` with
``hivemind.utils.streaming.split_for_streaming`` and packed greedily into messages of at most ``chunk_bytes``, so
small calls are a single message and large ones never hit the 4 MiB cap of one p2p message. The first message's
metadata says how many messages (``n_msgs``) and tensors (``n_tensors``) the call has, so several calls can follow
each other on one long-lived stream (a session, see :func:`iter_calls`) as well as one call per stream
(:func:`read_call`).

Readers enforce a byte budget per call: an oversized call is drained without being stored, so its caller still
gets a clear error, and the stream is cut off past ``DRAIN_FACTOR`` times the budget. Errors travel as
``{"error": "<message>"}`` in the metadata of a response without tensors (:func:`error_response`). This module
knows nothing about experts: the server and the client decide what the tensors mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence, Union

import msgpack
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarmtrain.expert_pool.codec import WireError

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20  # well under hivemind's 4 MiB message cap
MAX_METADATA_BYTES = 1 << 16
DRAIN_FACTOR = 4  # an oversized call is read (and dropped) up to this many times the limit, then cut off

Message = Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse]


@dataclass
class Call:
    """One received call: ``error`` is set (and ``tensors`` empty) when the call itself was malformed."""

    uid: str
    meta: dict
    tensors: list[runtime_pb2.Tensor] = field(default_factory=list)
    error: Optional[str] = None


def pack_request(
    uid: str, meta: dict, tensors: Sequence[runtime_pb2.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[runtime_pb2.ExpertRequest]:
    """The messages of one request to expert ``uid``."""
    return _pack(runtime_pb2.ExpertRequest, meta, tensors, chunk_bytes, uid=uid)


def pack_response(
    meta: dict, tensors: Sequence[runtime_pb2.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[runtime_pb2.ExpertResponse]:
    """The messages of one successful response."""
    return _pack(runtime_pb2.ExpertResponse, meta, tensors, chunk_bytes)


def error_response(message: str, **meta) -> list[runtime_pb2.ExpertResponse]:
    """A response that tells the caller why its request was refused."""
    return _pack(runtime_pb2.ExpertResponse, {**meta, "error": message[:4000]}, (), DEFAULT_CHUNK_BYTES)


async def read_call(stream: AsyncIterator[Message], max_bytes: Optional[int] = None, whole: bool = True) -> Call:
    """Receive the single call of a stream; raise WireError if it is malformed or (``whole``: read to the end of
    the stream) the stream holds more. A caller reading an answer passes ``whole=False``: the server keeps its
    side open until the caller closes, so waiting for the end would wait for the server's timeout."""
    calls = iter_calls(stream, max_bytes)
    call = None
    try:
        async for received in calls:
            if call is not None:
                raise WireError("expected one call per stream, received more")
            call = received
            if not whole:
                break
    finally:
        await calls.aclose()
    if call is None:
        raise WireError("empty call: no message received")
    if call.error is not None:
        raise WireError(call.error)
    return call


async def iter_calls(stream: AsyncIterator[Message], max_bytes: Optional[int] = None) -> AsyncIterator[Call]:
    """Split a stream into calls. A call over ``max_bytes`` or with inconsistent tensors is yielded with ``error``
    set; a stream that cannot be split any more (bad first message, cut-off call) raises WireError."""
    current: Optional[Call] = None
    remaining, total, parts = 0, 0, []
    async for message in stream:
        if current is None:
            current = Call(getattr(message, "uid", ""), unpack_metadata(message.metadata))
            remaining, total, parts = _count(current.meta, "n_msgs", minimum=1), 0, []
        total += sum(len(part.buffer) for part in message.tensors)
        if max_bytes is not None and total > DRAIN_FACTOR * max_bytes:
            raise WireError(f"call carries more than {DRAIN_FACTOR * max_bytes} bytes of tensors; stream closed")
        if max_bytes is None or total <= max_bytes:
            parts.extend(message.tensors)
        remaining -= 1
        if remaining == 0:
            yield _finish(current, parts, total, max_bytes)
            current = None
    if current is not None:
        raise WireError(f"stream ended inside a call: {remaining} more message(s) were announced")


def unpack_metadata(raw: bytes) -> dict:
    """Decode a message's msgpack metadata into a dict with str keys; raise WireError otherwise."""
    if len(raw) > MAX_METADATA_BYTES:
        raise WireError(f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True) if raw else {}
    except Exception as e:
        raise WireError(f"undecodable metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise WireError(f"metadata must be a map, got {type(meta).__name__}")
    return meta


def _finish(call: Call, parts: list, total: int, max_bytes: Optional[int]) -> Call:
    if max_bytes is not None and total > max_bytes:
        call.error = f"request carries {total} bytes of tensors, more than the limit {max_bytes}"
        return call
    try:
        call.tensors = _combine(parts)
        declared = _count(call.meta, "n_tensors", minimum=0)
        if declared != len(call.tensors):
            raise WireError(f"metadata announces {declared} tensors, received {len(call.tensors)}")
    except WireError as e:
        call.tensors, call.error = [], str(e)
    return call


def _count(meta: dict, key: str, minimum: int) -> int:
    value = meta.get(key, 1 if key == "n_msgs" else 0)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 1 << 20:
        raise WireError(f"metadata field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _pack(cls, meta: dict, tensors: Sequence[runtime_pb2.Tensor], chunk_bytes: int, **first_fields) -> list:
    groups: list[list[runtime_pb2.Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        for part in split_for_streaming(tensor, chunk_bytes):
            if size + len(part.buffer) > chunk_bytes and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(part)
            size += len(part.buffer)
    meta = dict(meta, n_tensors=len(tensors), n_msgs=len(groups), v=PROTOCOL_VERSION)
    messages = [cls(tensors=groups[0], metadata=msgpack.packb(meta, use_bin_type=True), **first_fields)]
    messages.extend(cls(tensors=group) for group in groups[1:])
    return messages


def _combine(parts: list[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """Reassemble tensors split by ``split_for_streaming`` (the first part of each says how many chunks)."""
    tensors, i = [], 0
    while i < len(parts):
        head = parts[i]
        n_chunks = max(int(head.chunks), 1)  # an empty tensor is sent as one part announcing 0 chunks
        if i + n_chunks > len(parts):
            raise WireError(f"tensor {len(tensors)} announces {n_chunks} chunks, only {len(parts) - i} arrived")
        tensor = runtime_pb2.Tensor()
        tensor.CopyFrom(head)
        tensor.chunks = 0
        if n_chunks > 1:
            tensor.buffer = b"".join(part.buffer for part in parts[i : i + n_chunks])
        tensors.append(tensor)
        i += n_chunks
    return tensors
