"""Wire encodings of averaging traffic: float32, float16 and 8-bit blockwise (bitsandbytes), plus error feedback.

A flat parameter vector is sent as a sequence of :class:`Segment` s (a range of the vector and the codec for it).
With codec ``"8bit"`` each parameter tensor with at least :data:`SMALL_TENSOR` elements is quantized blockwise
(bitsandbytes' dynamic 8-bit map, one float32 absmax per ``blocksize`` elements); smaller tensors (biases, norms)
are sent as float16, where 8-bit blocks would cost more in absmax overhead and error than they save.

:class:`ErrorFeedback` keeps, per element, what quantization dropped last time and adds it to the next message
(Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error feedback fixes SignSGD"):
``e_{t+1} = x_t + e_t - Q(x_t + e_t)``, so the sum of what was sent tracks the sum of what was meant to be sent to
within one step's quantization error instead of drifting.

Optionally (``entropy=True``, manifest ``averaging.entropy_coding``) an 8-bit message is further compressed,
losslessly, with zstd (level 1: Huffman coding of the byte values). bitsandbytes' dynamic map uses its 256 codes
unevenly (blockwise-quantized Gaussian values carry ~7.07 bits of entropy per code), so this saves ~11% of the
bytes (0.89 bytes per element) for ~3-6 ms of CPU per million elements per side: a clear win on volunteers'
home uplinks, a small loss on a LAN. Receivers accept both forms whatever their own setting (the dtype tag says).

This module only converts tensors to and from bytes; it knows nothing about peers or the protocol. Decoding
validates sizes and rejects non-finite values with :class:`WireError` (the caller drops the message).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import zstandard
from hivemind.proto import runtime_pb2

from swarmtrain.averaging import blockwise
from swarmtrain.averaging.blockwise import Scratch

Codec = Literal["none", "fp16", "8bit"]
CODECS: tuple[str, ...] = ("none", "fp16", "8bit")
SMALL_TENSOR = 4096  # tensors with fewer elements travel as float16 under the 8-bit codec
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels accept

_WIRE = {  # segment codec -> (protobuf compression, dtype tag)
    "none": (runtime_pb2.CompressionType.NONE, "float32"),
    "fp16": (runtime_pb2.CompressionType.FLOAT16, "float16"),
    "8bit": (runtime_pb2.CompressionType.BLOCKWISE_8BIT, "uint8-blockwise"),
}
_BY_COMPRESSION = {compression: name for name, (compression, _) in _WIRE.items()}
ENTROPY_CODED = "uint8-blockwise-zstd"  # dtype tag of an 8-bit message whose bytes are zstd-compressed
ENTROPY_LEVEL = 1
_zstd = threading.local()  # zstd contexts are not thread-safe: one compressor/decompressor per thread


class WireError(ValueError):
    """A received chunk is malformed, has the wrong size, or holds NaN/Inf."""


class LocalDataError(ValueError):
    """Our own values cannot be sent (NaN/Inf, or out of float16 range): nothing is sent, nobody is to blame."""


@dataclass(frozen=True)
class Segment:
    """Flat elements ``[lo, hi)`` sent as one message with ``codec``."""

    lo: int
    hi: int
    codec: str


def plan_segments(sizes: Sequence[int], codec: str, chunk_elems: int, blocksize: int = 4096) -> list[Segment]:
    """Split a flat vector made of tensors of ``sizes`` into wire segments of at most ``chunk_elems`` elements.

    For ``"none"``/``"fp16"`` the vector is cut evenly. For ``"8bit"``, each run of consecutive large tensors is
    cut at multiples of ``blocksize`` (a block may straddle two tensors of one run) and each run of small tensors
    is packed into float16 segments. :class:`~swarmtrain.averaging.replica.LocalReplica` orders the tensors large
    first, so a model's many weight/bias pairs travel as a few long segments instead of one or two per tensor.
    """
    check_codec(codec, blocksize)
    if chunk_elems < blocksize:
        raise ValueError(f"chunk_elems={chunk_elems} must be at least blocksize={blocksize}")
    total = int(sum(sizes))
    if codec != "8bit":
        return [Segment(lo, min(lo + chunk_elems, total), codec) for lo in range(0, total, chunk_elems)]
    step = chunk_elems - chunk_elems % blocksize
    segments: list[Segment] = []
    small_lo = None
    offset = 0
    large_lo = None

    def flush_large(end: int) -> None:
        segments.extend(Segment(lo, min(lo + step, end), "8bit") for lo in range(large_lo, end, step))

    for size in sizes:
        if size < SMALL_TENSOR:
            if large_lo is not None:
                flush_large(offset)
                large_lo = None
            if small_lo is None:
                small_lo = offset
            elif offset + size - small_lo > chunk_elems:
                segments.append(Segment(small_lo, offset, "fp16"))
                small_lo = offset
        else:
            if small_lo is not None:
                segments.append(Segment(small_lo, offset, "fp16"))
                small_lo = None
            if large_lo is None:
                large_lo = offset
        offset += size
    if large_lo is not None:
        flush_large(offset)
    if small_lo is not None and offset > small_lo:
        segments.append(Segment(small_lo, offset, "fp16"))
    return segments


def encode(
    x: torch.Tensor,
    codec: str,
    blocksize: int = 4096,
    with_decoded: bool = True,
    check_finite: bool = True,
    scratch: Optional[Scratch] = None,
    entropy: bool = False,
) -> tuple[runtime_pb2.Tensor, Optional[torch.Tensor]]:
    """Encode the float32 vector ``x``: (message, what the receiver will decode from it, if ``with_decoded``).

    Lossy codecs refuse non-finite input with :class:`LocalDataError` (8-bit quantization would silently turn
    a NaN into a finite number, and float16 turns values beyond 65504 into Inf). A caller that has already
    checked ``x`` (e.g. by computing its norm) passes ``check_finite=False`` to skip the 8-bit codec's extra pass;
    float16 overflow is always checked. ``scratch`` (one per thread) saves allocating the 8-bit buffer each time.
    ``entropy`` zstd-compresses an 8-bit message (kept raw in the rare case that would not make it smaller).
    """
    x = x.reshape(-1)
    if x.dtype != torch.float32:
        raise TypeError(f"encode expects float32, got {x.dtype}")
    compression, dtype = _WIRE[check_codec(codec, blocksize)]
    n = x.numel()
    if codec == "none":
        buffer, decoded = x.numpy().tobytes(), x
    elif codec == "fp16":
        half = x.to(torch.float16)
        if not _finite(half):
            raise LocalDataError(f"cannot send {n} values as float16: NaN, Inf or beyond +-65504")
        buffer = half.numpy().tobytes()
        decoded = half.to(torch.float32) if with_decoded else None
    else:
        if check_finite and not _finite(x):
            raise LocalDataError(f"cannot send {n} values as 8-bit: they hold NaN or Inf")
        nblocks = -(-n // blocksize)
        wire = scratch.get(4 * nblocks + n) if scratch is not None else torch.empty(4 * nblocks + n, dtype=torch.uint8)
        absmax, codes = wire[: 4 * nblocks].view(torch.float32), wire[4 * nblocks :]
        blockwise.quantize_into(x.contiguous(), absmax, codes, blocksize)
        buffer = wire.numpy().tobytes()
        decoded = blockwise.dequantize_into(codes, absmax, torch.empty(n), blocksize) if with_decoded else None
        if entropy:
            packed = _zstd_contexts()[0].compress(buffer)
            if len(packed) < len(buffer):
                buffer, dtype = packed, ENTROPY_CODED
    message = runtime_pb2.Tensor(buffer=buffer, size=[n], dtype=dtype, compression=compression)
    return message, decoded


def decode(
    message: runtime_pb2.Tensor, numel: int, blocksize: int = 4096, out: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, str]:
    """Decode a message holding exactly ``numel`` finite values: (float32 vector, its codec); else WireError.

    With ``out`` (a contiguous float32 CPU tensor of ``numel`` elements) the values are written there.
    """
    name = _BY_COMPRESSION.get(message.compression)
    entropy_coded = name == "8bit" and message.dtype == ENTROPY_CODED
    if name is None or (message.dtype != _WIRE[name][1] and not entropy_coded):
        raise WireError(f"unknown encoding compression={message.compression} dtype={message.dtype!r}")
    if list(message.size) != [numel]:
        raise WireError(f"chunk has size {list(message.size)}, expected [{numel}]")
    out = torch.empty(numel, dtype=torch.float32) if out is None else out
    buffer = message.buffer
    if name == "8bit":
        nblocks = -(-numel // blocksize)
        if entropy_coded:
            buffer = _decompress(buffer, 4 * nblocks + numel)
        if len(buffer) != 4 * nblocks + numel:
            raise WireError(f"8-bit chunk of {numel} elements has {len(buffer)} bytes, expected {4 * nblocks + numel}")
        # codes map into [-1, 1]: the values are finite iff every block scale is
        if not np.isfinite(np.frombuffer(buffer, dtype=np.float32, count=nblocks)).all():
            raise WireError(f"chunk of {numel} elements holds NaN or Inf")
        return blockwise.dequantize_bytes_into(buffer, numel, out, blocksize), name
    width = 4 if name == "none" else 2
    if len(buffer) != width * numel:
        raise WireError(f"{name} chunk of {numel} elements has {len(buffer)} bytes, expected {width * numel}")
    np.copyto(out.numpy(), np.frombuffer(buffer, dtype=np.float32 if name == "none" else np.float16))
    if not _finite(out):
        raise WireError(f"chunk of {numel} elements holds NaN or Inf")
    return out, name


def _finite(x: torch.Tensor) -> bool:
    """Whether every element is finite: one fast reduction (a NaN or Inf anywhere makes the sum non-finite;
    so would finite values summing beyond float32 range, far outside any parameter's)."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32)))


def _zstd_contexts() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """This thread's zstd compressor and decompressor (created on first use)."""
    if not hasattr(_zstd, "contexts"):
        _zstd.contexts = (zstandard.ZstdCompressor(level=ENTROPY_LEVEL), zstandard.ZstdDecompressor())
    return _zstd.contexts


def _decompress(buffer: bytes, expected: int) -> bytes:
    """The zstd frame ``buffer`` decompressed, which must be exactly ``expected`` bytes (else WireError: a frame
    that claims or holds more is never expanded beyond ``expected``)."""
    try:
        size = zstandard.frame_content_size(buffer)
        if size not in (expected, zstandard.CONTENTSIZE_UNKNOWN):
            raise WireError(f"entropy-coded chunk expands to {size} bytes, expected {expected}")
        raw = _zstd_contexts()[1].decompress(buffer, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise WireError(f"undecodable entropy-coded chunk: {e}") from e
    if len(raw) != expected:
        raise WireError(f"entropy-coded chunk expands to {len(raw)} bytes, expected {expected}")
    return raw


def check_codec(codec: str, blocksize: int = 4096) -> str:
    """Return ``codec`` if it and ``blocksize`` are supported, else raise ValueError."""
    if codec not in CODECS:
        raise ValueError(f"unknown averaging codec {codec!r}; choose one of {CODECS}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported by bitsandbytes; choose one of {BLOCKSIZES}")
    return codec


class ErrorFeedback:
    """Per-element residuals of lossy encoding, for one flat vector of ``numel`` elements.

    Residuals computed during an exchange are kept aside until :meth:`commit` (the partner used our message) or
    :meth:`discard` (the exchange failed: what we meant to send was not delivered, so the old residuals stay).

    Example (one round)::

        y = feedback.compensate(lo, x)          # x_t + e_t
        message, decoded = encode(y, "8bit")
        feedback.update(lo, y, decoded)         # e_{t+1} = (x_t + e_t) - Q(x_t + e_t)
        ...
        feedback.commit()
    """

    def __init__(self, numel: int):
        self.numel = numel
        self.residual: Optional[torch.Tensor] = None  # e_t, allocated on the first lossy update
        self._pending: Optional[torch.Tensor] = None  # e_{t+1}, being written during an exchange

    def compensate(self, lo: int, x: torch.Tensor) -> torch.Tensor:
        """``x + e[lo:lo+len(x)]`` (``x`` itself while there are no residuals yet; never modified)."""
        if self.residual is None:
            return x
        return x + self.residual[lo : lo + x.numel()]

    def update(self, lo: int, meant: torch.Tensor, decoded: torch.Tensor) -> float:
        """Remember what encoding dropped from ``meant`` (the compensated vector) over ``[lo, lo+len)``;
        returns the squared L2 norm of what was dropped."""
        if self._pending is None:
            self._pending = torch.zeros(self.numel, dtype=torch.float32)
        dropped = self._pending[lo : lo + meant.numel()]
        torch.sub(meant, decoded, out=dropped)
        return float(torch.dot(dropped, dropped))

    def skip(self, lo: int, n: int) -> None:
        """Nothing was dropped over ``[lo, lo+n)`` this time (e.g. those values went as differences from a shared
        reference, which carries any error into the next exchange by itself)."""
        if self._pending is None:
            self._pending = torch.zeros(self.numel, dtype=torch.float32)
        self._pending[lo : lo + n].zero_()

    def commit(self) -> None:
        """The message was used: the residuals written since the last commit become current."""
        if self._pending is not None:
            self.residual, self._pending = self._pending, self.residual

    def discard(self) -> None:
        """The message was not used: keep the current residuals (the pending buffer is rewritten next time)."""

    def norm(self) -> float:
        """L2 norm of the current residuals (0 before any lossy update)."""
        return 0.0 if self.residual is None else float(self.residual.norm())
