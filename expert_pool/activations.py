"""What a server keeps between a caller's forward and backward call to one expert, so backward needs neither a
recomputed forward nor the caller's inputs sent again.

hivemind's ``ModuleBackend`` (and our first version) recomputes the forward inside backward, and the caller sends
``x`` twice. Keeping the expert's saved activations (``ExpertFFN.forward_saving``: the rows ``x`` and the
pre-activation ``W1 x + b1``) for calls that will be followed by a backward removes a third of the backward's
matrix products and a third of the backward bytes. The cost is memory, which this cache bounds: entries expire
after ``ttl_s`` and the oldest are dropped beyond ``max_bytes``. A caller whose entry is gone gets a clear
refusal and sends its inputs again (the recompute path), so eviction never loses a gradient.

Entries are keyed by (caller peer id, number): a caller can only use its own entries, and only once.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_TTL_S = 60.0


@dataclass
class Saved:
    """Activations of one forward call of one expert."""

    uid: str
    tensors: tuple[torch.Tensor, ...]  # (x, pre) for ExpertFFN, each [rows, *]
    expires: float
    nbytes: int

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0])


class ActivationCache:
    """Saved activations of forward calls awaiting their backward, bounded by age and total bytes.

    :param max_bytes: the oldest entries are dropped once the entries take more than this
    :param ttl_s: an entry not claimed by a backward within this time is dropped
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl_s: float = DEFAULT_TTL_S):
        if max_bytes < 0 or ttl_s <= 0:
            raise ValueError(f"max_bytes must be >= 0 and ttl_s > 0, got {max_bytes}, {ttl_s}")
        self.max_bytes, self.ttl_s = int(max_bytes), float(ttl_s)
        self._entries: collections.OrderedDict[tuple[str, int], Saved] = collections.OrderedDict()
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.dropped = 0  # entries evicted (expired or over the byte budget) before their backward claimed them

    def put(self, caller: str, uid: str, tensors: tuple[torch.Tensor, ...]) -> Optional[int]:
        """Keep ``tensors`` for ``caller``'s backward of expert ``uid``; returns the number the backward must
        quote, or None when a single entry would not fit the budget (the caller then resends its inputs)."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if nbytes > self.max_bytes:
            return None
        with self._lock:
            number = next(self._numbers)
            self._entries[(caller, number)] = Saved(uid, tensors, time.monotonic() + self.ttl_s, nbytes)
            self.nbytes += nbytes
            self._evict(time.monotonic())
            return number if (caller, number) in self._entries else None

    def take(self, caller: str, number: int, uid: str) -> Optional[Saved]:
        """Remove and return the entry ``number`` of ``caller`` for expert ``uid`` (None: unknown or expired)."""
        with self._lock:
            self._evict(time.monotonic())
            saved = self._entries.get((caller, number))
            if saved is None or saved.uid != uid:
                return None
            del self._entries[(caller, number)]
            self.nbytes -= saved.nbytes
            return saved

    def drop(self, uid: Optional[str] = None) -> int:
        """Forget the entries of expert ``uid`` (every entry if None), e.g. when it stops being hosted here; their
        backward calls will resend their inputs. Returns how many were dropped."""
        with self._lock:
            keys = [key for key, saved in self._entries.items() if uid is None or saved.uid == uid]
            for key in keys:
                self.nbytes -= self._entries.pop(key).nbytes
            return len(keys)

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, now: float) -> None:
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if oldest.expires > now and self.nbytes <= self.max_bytes:
                return
            del self._entries[key]
            self.nbytes -= oldest.nbytes
            self.dropped += 1
