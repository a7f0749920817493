"""Tensor codecs of the expert pool's wire: how activations and gradients are turned into bytes and back.

Three codecs, chosen per request by the caller (``Manifest.expert_pool.wire_codec`` for the swarm):

* ``none``: raw float32 (4 bytes per element), lossless.
* ``fp16``: float16 on the wire (2 bytes per element), decoded back to float32.
* ``blockwise8``: 8-bit dynamic blockwise quantisation with bitsandbytes (``quantize_blockwise``, CPU-capable),
  ~1 byte per element plus one float32 absmax per block. hivemind's own 8-bit codecs are not used: on NumPy >= 2.4
  their ``extract()`` raises TypeError.

Encoded tensors travel in hivemind's ``runtime_pb2.Tensor`` (buffer, shape, dtype, compression), so they can be
chunked with ``hivemind.utils.streaming``. :func:`decode_tensor` trusts nothing: every length, shape and dtype is
checked against the buffer, and anything inconsistent raises :class:`WireError` with a message saying what.
This module is not for choosing codecs or validating what a tensor means (shape vs. an expert): see
:mod:`swarmtrain.expert_pool.wire` and the server.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from hivemind.proto import runtime_pb2

CODECS: tuple[str, ...] = ("none", "fp16", "blockwise8")
BLOCKSIZE = 4096  # elements per absmax block of the 8-bit codec

_COMPRESSION = {
    "none": runtime_pb2.CompressionType.NONE,
    "fp16": runtime_pb2.CompressionType.FLOAT16,
    "blockwise8": runtime_pb2.CompressionType.BLOCKWISE_8BIT,
}
_CODEC_OF = {value: name for name, value in _COMPRESSION.items()}
# dtypes a raw ("none") tensor may declare; anything else is refused before touching the buffer
_RAW_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_MAX_DIMS = 8


class WireError(ValueError):
    """Bytes received from a peer do not form a valid message or tensor; the message says why."""


def check_codec(codec: str) -> str:
    """Return ``codec`` if it is one of :data:`CODECS`, else raise WireError naming the choices."""
    if codec not in CODECS:
        raise WireError(f"unknown wire codec {codec!r}; choose one of {list(CODECS)}")
    return codec


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. For CPU float tensors NumPy's check is used: ~20x faster than
    ``torch.isfinite(t).all()`` on an expert call's rows ([32, 512]: 4 us vs 80 us), which every request pays."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16, torch.float64):
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def encode_tensor(tensor: torch.Tensor, codec: str = "none") -> runtime_pb2.Tensor:
    """Serialize a CPU tensor; lossy codecs apply to floating tensors only (others are sent raw)."""
    check_codec(codec)
    tensor = tensor.detach().cpu().contiguous()
    if codec != "none" and tensor.dtype != torch.float32:
        codec = "none"  # only float32 activations are compressed; other dtypes go raw (and are refused by servers)
    shape = list(tensor.shape)
    if codec == "none":
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if dtype_name not in _RAW_DTYPES:
            raise WireError(f"cannot send tensors of dtype {tensor.dtype}")
        buffer = tensor.numpy().tobytes()
    elif codec == "fp16":
        dtype_name = "float32"
        buffer = tensor.to(torch.float16).numpy().tobytes()
    else:
        dtype_name = "float32"
        buffer = _quantize_blockwise8(tensor)
    return runtime_pb2.Tensor(
        buffer=buffer, size=shape, dtype=dtype_name, compression=_COMPRESSION[codec], requires_grad=False
    )


def decode_tensor(proto: runtime_pb2.Tensor, max_elements: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; raise WireError on any inconsistency between header and buffer."""
    codec = _CODEC_OF.get(proto.compression)
    if codec is None:
        raise WireError(f"unsupported tensor compression {proto.compression}; this server speaks {list(CODECS)}")
    shape = list(proto.size)
    if len(shape) > _MAX_DIMS or any(dim < 0 for dim in shape):
        raise WireError(f"invalid tensor shape {shape}")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise WireError(f"tensor of shape {shape} has {numel} elements, more than the limit {max_elements}")
    buffer = proto.buffer
    if codec == "none":
        np_dtype = _RAW_DTYPES.get(proto.dtype)
        if np_dtype is None:
            raise WireError(f"unsupported tensor dtype {proto.dtype!r}")
        expected = numel * np.dtype(np_dtype).itemsize
        _check_length(buffer, expected, shape, codec)
        array = np.frombuffer(buffer, dtype=np_dtype).copy()
        return torch.from_numpy(array).reshape(shape)
    if proto.dtype != "float32":
        raise WireError(f"{codec} tensors must decode to float32, header says {proto.dtype!r}")
    if codec == "fp16":
        _check_length(buffer, numel * 2, shape, codec)
        array = np.frombuffer(buffer, dtype=np.float16).astype(np.float32)
        return torch.from_numpy(array).reshape(shape)
    return _dequantize_blockwise8(buffer, shape, numel)


def encoded_nbytes(numel: int, codec: str) -> int:
    """Bytes on the wire of a float32 tensor with ``numel`` elements (payload only, no headers)."""
    if codec == "none":
        return 4 * numel
    if codec == "fp16":
        return 2 * numel
    return numel + 4 * _num_blocks(numel)


def _check_length(buffer: bytes, expected: int, shape: list[int], codec: str) -> None:
    if len(buffer) != expected:
        raise WireError(f"{codec} tensor of shape {shape} needs {expected} bytes, got {len(buffer)}")


def _num_blocks(numel: int) -> int:
    return (numel + BLOCKSIZE - 1) // BLOCKSIZE


def _quantize_blockwise8(tensor: torch.Tensor) -> bytes:
    from bitsandbytes.functional import quantize_blockwise  # imported on use: slow import, prints warnings

    if tensor.numel() == 0:
        return b""
    quantized, state = quantize_blockwise(tensor.reshape(-1), blocksize=BLOCKSIZE)
    absmax = state.absmax.to(torch.float32).numpy().tobytes()
    return absmax + quantized.numpy().tobytes()


def _dequantize_blockwise8(buffer: bytes, shape: list[int], numel: int) -> torch.Tensor:
    n_blocks = _num_blocks(numel)
    _check_length(buffer, numel + 4 * n_blocks, shape, "blockwise8")
    if numel == 0:
        return torch.zeros(shape)
    from bitsandbytes.functional import dequantize_blockwise

    absmax = torch.from_numpy(np.frombuffer(buffer, dtype=np.float32, count=n_blocks).copy())
    if not torch.isfinite(absmax).all():
        raise WireError("blockwise8 tensor has non-finite block scales")
    quantized = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, offset=4 * n_blocks).copy())
    values = dequantize_blockwise(quantized, absmax=absmax, code=_dynamic_map(), blocksize=BLOCKSIZE)
    return values.to(torch.float32).reshape(shape)


_DYNAMIC_MAP: Optional[torch.Tensor] = None


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' default dynamic map (the ``code`` quantize_blockwise uses when given none)."""
    global _DYNAMIC_MAP
    if _DYNAMIC_MAP is None:
        from bitsandbytes.functional import create_dynamic_map

        _DYNAMIC_MAP = create_dynamic_map()
    return _DYNAMIC_MAP
