"""Shared reference vectors of averaging pairs: what lets 8-bit exchanges carry *differences* instead of values.

An 8-bit blockwise value loses ~1% of its block's largest magnitude. Sending a peer's values ``x`` that way keeps
a pair about 1% of ``|x|`` apart, which is why the initiator's values otherwise go as float16 once a pair is
close (``averaging.adaptive_precision``, 2 bytes per element). Instead, after an exchange both sides of the pair
keep the same vector ``R = A + D / 2`` (``A``: the initiator's values as the partner decoded them, ``D``: the
decoded move both applied; roughly where both ended up) under a token the initiator chose. The next time the
two meet, in either role, the initiator sends ``Q8(x - R)`` and the partner reconstructs ``A = R + decoded``:
the 8-bit error is then ~1% of ``|x - R|`` (training progress and averaging moves since they last met), not of
``|x|``, at one byte per element. This is the "public copy" idea of CHOCO-gossip (Koloskova, Stich and Jaggi,
"Decentralized Stochastic Optimization and Gossip Algorithms with Compressed Communication", ICML 2019),
here kept per pair because partners are random rather than fixed neighbours.

Both sides must hold bit-identical vectors: ``R`` is built only from decoded tensors both have, with
``A + D * 0.5`` (an exact halving, then one rounding), and a side stores it only once its half of the exchange
is applied. If the two end up with different tokens (a lost "done"), the next hello's token does not match,
the partner says so, both drop the reference, and that exchange runs without it. Memory: one float32 copy of
the parameters per remembered partner, at most ``max_partners`` (least recently used dropped first).
"""
from __future__ import annotations

import collections
import threading
from typing import Optional

import torch


class PairReferences:
    """The reference vectors this peer shares with its recent partners (one per partner, LRU-bounded).

    :param numel: elements of the averaged vector
    :param max_partners: how many partners' references to keep (0: none, the feature is off)
    """

    def __init__(self, numel: int, max_partners: int):
        if max_partners < 0:
            raise ValueError(f"max_partners must be >= 0, got {max_partners}")
        self.numel, self.max_partners = numel, max_partners
        self._refs: collections.OrderedDict[str, tuple[int, torch.Tensor]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def token(self, peer: str) -> Optional[int]:
        """The token of our reference shared with ``peer`` (None: we have none)."""
        with self._lock:
            entry = self._refs.get(peer)
            return None if entry is None else entry[0]

    def get(self, peer: str, token: int) -> Optional[torch.Tensor]:
        """Our reference with ``peer`` if its token is ``token`` (else None: and a mismatched one is dropped)."""
        with self._lock:
            entry = self._refs.get(peer)
            if entry is None:
                return None
            if entry[0] != token:
                del self._refs[peer]
                return None
            self._refs.move_to_end(peer)
            return entry[1]

    def store(self, peer: str, token: int, values: torch.Tensor, move: torch.Tensor) -> None:
        """Remember ``values + move * 0.5`` as the reference shared with ``peer`` under ``token``."""
        if self.max_partners == 0:
            return
        if values.numel() != self.numel or move.numel() != self.numel:
            raise ValueError(f"a reference has {self.numel} elements, got {values.numel()} and {move.numel()}")
        reference = torch.mul(move, 0.5).add_(values)  # exact halving, then one rounding: identical on both sides
        with self._lock:
            self._refs.pop(peer, None)
            self._refs[peer] = (int(token), reference)
            while len(self._refs) > self.max_partners:
                self._refs.popitem(last=False)

    def drop(self, peer: str) -> None:
        """Forget the reference shared with ``peer``."""
        with self._lock:
            self._refs.pop(peer, None)

    def __len__(self) -> int:
        return len(self._refs)
