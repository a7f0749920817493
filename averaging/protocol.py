"""The messages of the averaging protocol (typed builders and a checking parser), nothing else.

Every message is a hivemind ``ExpertRequest`` (initiator -> partner) or ``ExpertResponse`` (partner -> initiator)
whose ``metadata`` is a msgpack map with a type tag ``t``; chunks carry one encoded tensor
(:mod:`swarmtrain.averaging.codec`). One exchange (``rpc_exchange``, a bidirectional stream)::

    initiator                                   partner
    hello {group, numel, layout, codec, ..., ref} ->
                                             <- accept {weight, state, sample, ref} | refuse {reason}
    chunk {o, r} + A[o:o+n]  (its values;  ->
      r: as 8-bit A - R, R the reference        <- chunk {o, m} + B[o:o+n]  (m="d": partner values - decoded A;
      the pair shares under hello's ref token)                               m="v": partner values)
    ... (pipelined, one reply per chunk)
    commit {factor, ref} | abort {reason}  ->
                                             <- done {}   (partner applied its half and, with a commit
                                                           ref token, stored the new reference) | refuse {reason}

A state transfer (``rpc_state``) is ``state {group, numel, layout}`` answered by ``accept``, float32 chunks and
``done``. :func:`parse` rejects anything unexpected with :class:`ProtocolError` naming what was wrong.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import msgpack
from hivemind.proto import runtime_pb2

PROTOCOL_VERSION = 3  # 2: tensors large-first, 8-bit segments span consecutive large tensors; 3: shared references


class ProtocolError(ValueError):
    """A peer sent a message that does not fit the protocol at this point."""


def request(kind: str, tensor: Optional[runtime_pb2.Tensor] = None, **fields: Any) -> runtime_pb2.ExpertRequest:
    """An initiator message of type ``kind`` (hello, chunk, commit, abort, state)."""
    return runtime_pb2.ExpertRequest(
        uid=kind, tensors=[tensor] if tensor is not None else [], metadata=_pack(kind, fields)
    )


def response(kind: str, tensor: Optional[runtime_pb2.Tensor] = None, **fields: Any) -> runtime_pb2.ExpertResponse:
    """A partner message of type ``kind`` (accept, refuse, chunk, done)."""
    return runtime_pb2.ExpertResponse(tensors=[tensor] if tensor is not None else [], metadata=_pack(kind, fields))


def hello(group: str, numel: int, layout: str, codec: str, blocksize: int, chunk_elems: int, weight: float,
          state: tuple[int, int] = (0, 0), unchanged_if: Optional[tuple[int, int]] = None, sample: bool = True,
          ref: Optional[int] = None):
    """The first message of an exchange: what the initiator averages (group, layout), how (codec, chunking), its
    push-sum weight and state (exchanges applied, local step); with ``unchanged_if`` the partner refuses
    ("unchanged") if its own state is still that one, i.e. the pair already agrees; ``sample``: whether the
    partner should send sampled values with "accept" (only needed to choose the precision of 8-bit values);
    ``ref``: the token of the reference vector the initiator shares with this partner, if any."""
    return request("hello", v=PROTOCOL_VERSION, group=group, numel=numel, layout=layout, codec=codec,
                   blocksize=blocksize, chunk_elems=chunk_elems, weight=weight, state=list(state),
                   unchanged_if=list(unchanged_if) if unchanged_if is not None else None, sample=sample, ref=ref)


def parse(message, expected: tuple[str, ...]) -> tuple[str, dict, Optional[runtime_pb2.Tensor]]:
    """(type, fields, tensor or None) of a message whose type is one of ``expected``; else ProtocolError."""
    try:
        meta = msgpack.unpackb(message.metadata, raw=False)
    except Exception as e:
        raise ProtocolError(f"undecodable message metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("t"), str):
        raise ProtocolError("message metadata is not a typed map")
    kind = meta.pop("t")
    if kind not in expected:
        raise ProtocolError(f"expected a message of type {'/'.join(expected)}, got {kind!r}")
    tensors = list(message.tensors)
    if len(tensors) > 1:
        raise ProtocolError(f"a {kind} message carries {len(tensors)} tensors, at most 1 allowed")
    return kind, meta, (tensors[0] if tensors else None)


def field(meta: dict, name: str, kind: type, *, low: Optional[float] = None, high: Optional[float] = None) -> Any:
    """``meta[name]`` checked to be a ``kind`` (int/float/str) within [low, high]; else ProtocolError."""
    value = meta.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise ProtocolError(f"field {name!r} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(f"field {name!r}={value} is outside [{low}, {high}]")
    return value


def _pack(kind: str, fields: dict) -> bytes:
    return msgpack.packb({"t": kind, **fields}, use_bin_type=True)
