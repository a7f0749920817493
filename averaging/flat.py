"""A list of parameter tensors seen as one flat float32 vector: read a range, add a delta to a range, copy all.

Averaging works on the concatenation of all replicated parameters; this module maps flat ranges back onto the
individual tensors (any shape, dtype, device) without ever reallocating them, so the trainer's optimizer keeps
pointing at the same storage. It does no locking: callers hold the trainer's lock around every call that reads or
writes the parameters.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import Sequence

import torch


class FlatParams:
    """A read/write flat view over ``params`` (kept by reference, updated in place).

    :param params: the tensors; each must be floating point (their dtypes and devices may differ)
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        params = list(params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"parameter {i} must be a floating-point tensor, got {type(p).__name__} "
                                f"{getattr(p, 'dtype', '')}")
        self.params = [p.detach() if p.requires_grad else p for p in params]
        sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.numel = self.offsets[-1]
        shapes = ";".join(f"{tuple(p.shape)}" for p in self.params)
        self.layout = hashlib.sha256(shapes.encode()).hexdigest()[:16]  # the layout, for compatibility checks

    def read(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """A float32 CPU copy of flat elements ``[lo, hi)``."""
        hi = self.numel if hi is None else hi
        self._check_range(lo, hi)
        out = torch.empty(hi - lo, dtype=torch.float32)
        for i, a, b in self._pieces(lo, hi):
            start = self.offsets[i] + a - lo
            out[start : start + (b - a)].copy_(self.params[i].reshape(-1)[a:b])
        return out

    def add_(self, lo: int, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """Add ``alpha *`` the float32 vector ``delta`` to flat elements ``[lo, lo + len(delta))`` in place."""
        hi = lo + delta.numel()
        self._check_range(lo, hi)
        for i, a, b in self._pieces(lo, hi):
            p = self.params[i]
            start = self.offsets[i] + a - lo
            update = delta[start : start + (b - a)].to(device=p.device, dtype=p.dtype)
            if p.is_contiguous():
                p.view(-1)[a:b].add_(update, alpha=alpha)
            else:
                _strided_add(p, a, b, update * alpha)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """A float32 CPU copy of the flat elements at sorted ``indices`` (int64)."""
        out = torch.empty(indices.numel(), dtype=torch.float32)
        bounds = torch.tensor(self.offsets, dtype=torch.int64)
        cuts = torch.searchsorted(indices, bounds).tolist()
        for i, p in enumerate(self.params):
            a, b = cuts[i], cuts[i + 1]
            if b > a:
                out[a:b] = p.reshape(-1)[indices[a:b] - self.offsets[i]].to(torch.float32).cpu()
        return out

    def copy_(self, flat: torch.Tensor) -> None:
        """Overwrite every parameter with the matching range of the float32 vector ``flat``."""
        if flat.numel() != self.numel:
            raise ValueError(f"cannot copy {flat.numel()} elements into parameters holding {self.numel}")
        for p, lo, hi in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            p.copy_(flat[lo:hi].view(p.shape).to(device=p.device, dtype=p.dtype))

    def _pieces(self, lo: int, hi: int):
        """(tensor index, start, end) triples covering flat range [lo, hi), in order; start/end index the tensor."""
        i = bisect.bisect_right(self.offsets, lo) - 1
        while lo < hi and i < len(self.params):
            base = self.offsets[i]
            end = min(hi, self.offsets[i + 1])
            if end > lo:
                yield i, lo - base, end - base
            lo = end
            i += 1

    def _check_range(self, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= self.numel:
            raise IndexError(f"flat range [{lo}, {hi}) is outside the parameters' {self.numel} elements")


def _strided_add(p: torch.Tensor, a: int, b: int, update: torch.Tensor) -> None:
    flat = p.reshape(-1)  # a copy for non-contiguous tensors: write the result back
    flat[a:b].add_(update)
    p.copy_(flat.view(p.shape))
