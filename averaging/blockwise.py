"""bitsandbytes' blockwise 8-bit kernels on CPU, writing into buffers the caller owns.

``torch.ops.bitsandbytes.quantize_blockwise`` / ``dequantize_blockwise`` allocate fresh outputs on every call;
for megabyte-sized chunks the page faults of those allocations, plus copying the results into wire buffers, cost
about a third of the kernels' own time. These functions call the same bitsandbytes C kernels that the torch ops
call on CPU (``lib.cquantize_blockwise_cpu_fp32`` / ``lib.cdequantize_blockwise_cpu_fp32``) with pointers into
a reused scratch buffer, into received bytes, or into the caller's destination tensor. Where those entry points
are missing (another bitsandbytes build) they fall back to the torch ops and copy. Nothing else lives here: the
wire format is :mod:`swarmtrain.averaging.codec`'s.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import numpy as np
import torch

_STATE: dict = {}  # filled on first use: "map" (the dynamic 8-bit map), "lib" (bitsandbytes' C library or None)
_STATE_LOCK = threading.Lock()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 float32 values)."""
    return _load()["map"]


def quantize_into(x: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor, blocksize: int) -> None:
    """Quantize the contiguous float32 CPU vector ``x`` into ``absmax`` (float32, one per block) and ``codes``
    (uint8, one per element)."""
    state = _load()
    n = x.numel()
    _check(x, torch.float32, n, "x")
    _check(absmax, torch.float32, -(-n // blocksize), "absmax")
    _check(codes, torch.uint8, n, "codes")
    if state["lib"] is not None:
        state["lib"].cquantize_blockwise_cpu_fp32(
            _ptr(state["map"]), _ptr(x), _ptr(absmax), _ptr(codes), ctypes.c_longlong(blocksize), ctypes.c_longlong(n)
        )
        return
    new_codes, new_absmax = torch.ops.bitsandbytes.quantize_blockwise.default(x, state["map"], blocksize)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


def dequantize_into(codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Dequantize ``codes``/``absmax`` (as produced by :func:`quantize_into`) into the float32 ``out``."""
    state = _load()
    n = codes.numel()
    _check(codes, torch.uint8, n, "codes")
    _check(absmax, torch.float32, -(-n // blocksize), "absmax")
    _check(out, torch.float32, n, "out")
    if state["lib"] is not None:
        state["lib"].cdequantize_blockwise_cpu_fp32(
            _ptr(state["map"]), _ptr(codes), _ptr(absmax), _ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(n)
        )
        return out
    return out.copy_(torch.ops.bitsandbytes.dequantize_blockwise.default(codes, absmax, state["map"], blocksize,
                                                                           torch.float32))


def dequantize_bytes_into(buffer: bytes, n: int, out: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Dequantize a wire buffer laid out as ``absmax`` (float32 per block) then ``codes`` (n bytes) into ``out``,
    reading the bytes in place. The caller has checked ``len(buffer)``."""
    state = _load()
    nblocks = -(-n // blocksize)
    _check(out, torch.float32, n, "out")
    if state["lib"] is not None:
        base = ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value  # the bytes object's own storage
        state["lib"].cdequantize_blockwise_cpu_fp32(
            _ptr(state["map"]), ctypes.c_void_p(base + 4 * nblocks), ctypes.c_void_p(base), _ptr(out),
            ctypes.c_longlong(blocksize), ctypes.c_longlong(n),
        )
        return out
    absmax = torch.from_numpy(np.frombuffer(buffer, dtype=np.float32, count=nblocks).copy())
    codes = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, offset=4 * nblocks).copy())
    return dequantize_into(codes, absmax, out, blocksize)


class Scratch:
    """A reusable byte buffer (grown on demand), so that repeated encodings touch memory already mapped.

    Not thread-safe: give each thread its own (e.g. through ``threading.local``).
    """

    def __init__(self):
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` (its contents are garbage)."""
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]


def _load() -> dict:
    if not _STATE:
        with _STATE_LOCK:
            if not _STATE:
                import bitsandbytes.functional as bnb_functional  # also registers torch.ops.bitsandbytes

                lib: Optional[object] = None
                try:
                    from bitsandbytes.cextension import lib as bnb_lib

                    if hasattr(bnb_lib, "cquantize_blockwise_cpu_fp32") and hasattr(
                        bnb_lib, "cdequantize_blockwise_cpu_fp32"
                    ):
                        lib = bnb_lib
                except Exception:  # noqa: BLE001 - no C library: use the torch ops
                    lib = None
                _STATE.update(map=bnb_functional.create_dynamic_map().contiguous(), lib=lib)
    return _STATE


def _check(t: torch.Tensor, dtype: torch.dtype, numel: int, name: str) -> None:
    if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of {numel} elements, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())
