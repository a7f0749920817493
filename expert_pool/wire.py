"""Message framing of the expert pool's RPCs: one call = a stream of ExpertRequest / ExpertResponse messages.

A call carries a msgpack dict (``metadata`` of the first message) and a list of tensors encoded by
:mod:`swarmtrain.expert_pool.codec`. Tensors are split into chunks of at most ``chunk_bytes`` with
``hivemind.utils.streaming.split_for_streaming`` and packed greedily into messages of at most ``chunk_bytes``, so
small calls are a single message and large ones never hit the 4 MiB cap of one p2p message. The reader enforces
a byte budget while receiving, so a peer cannot make us buffer more than a request may hold.

Errors travel as ``{"error": "<message>"}`` in the metadata of a response without tensors (see
:func:`error_response`); transport failures surface as hivemind's P2PHandlerError. This module knows nothing
about experts: the server and the client decide what the tensors mean.
"""
from __future__ import annotations

from typing import AsyncIterator, Optional, Sequence, Union

import msgpack
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarmtrain.expert_pool.codec import WireError

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20  # well under hivemind's 4 MiB message cap
MAX_METADATA_BYTES = 1 << 16
DRAIN_FACTOR = 4  # an oversized request is read (and dropped) up to this many times the limit, then cut off

Message = Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse]


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


def error_response(message: str) -> list[runtime_pb2.ExpertResponse]:
    """A response that tells the caller why its request was refused."""
    return _pack(runtime_pb2.ExpertResponse, {"error": message[:4000]}, (), DEFAULT_CHUNK_BYTES)


async def read_call(
    stream: AsyncIterator[Message], max_bytes: Optional[int] = None
) -> tuple[str, dict, list[runtime_pb2.Tensor]]:
    """Receive one call: (uid, metadata, tensors); uid is "" for responses. Raise WireError on malformed input."""
    uid, meta, parts, total = None, None, [], 0
    async for message in stream:
        if meta is None:
            uid = getattr(message, "uid", "")
            meta = unpack_metadata(message.metadata)
        total += sum(len(part.buffer) for part in message.tensors)
        if max_bytes is None or total <= max_bytes:
            parts.extend(message.tensors)
        elif total > DRAIN_FACTOR * max_bytes:  # stop reading: the caller sees the stream closed
            raise WireError(f"request carries more than {max_bytes} bytes of tensors")
        # else: over budget, keep reading without storing so the caller still receives our error reply
    if meta is None:
        raise WireError("empty call: no message received")
    if max_bytes is not None and total > max_bytes:
        raise WireError(f"request carries {total} bytes of tensors, more than the limit {max_bytes}")
    tensors = _combine(parts)
    declared = meta.get("n_tensors", 0)
    if "error" not in meta and declared != len(tensors):
        raise WireError(f"metadata announces {declared!r} tensors, received {len(tensors)}")
    return uid, meta, tensors


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


def _pack(cls, meta: dict, tensors: Sequence[runtime_pb2.Tensor], chunk_bytes: int, **first_fields) -> list:
    meta = dict(meta, n_tensors=len(tensors), v=PROTOCOL_VERSION)
    messages = [cls(metadata=msgpack.packb(meta, use_bin_type=True), **first_fields)]
    size = 0
    for tensor in tensors:
        for part in split_for_streaming(tensor, chunk_bytes):
            if size + len(part.buffer) > chunk_bytes and messages[-1].tensors:
                messages.append(cls())
                size = 0
            messages[-1].tensors.append(part)
            size += len(part.buffer)
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
