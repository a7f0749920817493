"""The expert network hosted by volunteers: one feed-forward block of a transformer layer."""
from __future__ import annotations

import torch
from torch import nn


class ExpertFFN(nn.Module):
    """``x -> W2 gelu(W1 x)``: the feed-forward half of a transformer block (pre-normed by the caller).

    Input and output are ``[rows, hidden]`` float32; every row is independent, so rows from many callers and
    many samples can be batched into one call.
    """

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.hidden, self.ffn = hidden, ffn
        self.w1 = nn.Linear(hidden, ffn)
        self.w2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.gelu(self.w1(x)))


def make_expert(uid: str, hidden: int, ffn: int, seed: int) -> ExpertFFN:
    """A freshly initialised expert; the same (uid, seed) gives the same weights on every peer."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed((seed * 1_000_003 + _stable_hash(uid)) % (2**31))
        return ExpertFFN(hidden, ffn)
    finally:
        torch.random.set_rng_state(generator_state)


def _stable_hash(text: str) -> int:
    value = 0
    for byte in text.encode():
        value = (value * 131 + byte) % (2**31 - 1)
    return value
