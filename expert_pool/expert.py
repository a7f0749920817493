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

    @torch.no_grad()
    def forward_saving(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), pre)`` where ``pre = W1 x + b1`` is what :meth:`backward_saved` needs: a server keeps it
        between a caller's forward and backward calls instead of recomputing the forward."""
        pre = self.w1(x)
        return self.w2(nn.functional.gelu(pre)), pre

    @torch.no_grad()
    def backward_saved(self, x: torch.Tensor, pre: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. ``x`` of ``<forward(x), grad_out>`` from the saved pre-activation; sets every
        parameter's ``.grad`` to this batch's gradient. Four matrix products instead of autograd's six with a
        recomputed forward; equal to autograd up to float rounding (tested)."""
        act = nn.functional.gelu(pre)
        self.w2.weight.grad = grad_out.t() @ act
        self.w2.bias.grad = grad_out.sum(0)
        grad_pre = torch.ops.aten.gelu_backward(grad_out @ self.w2.weight, pre)
        self.w1.weight.grad = grad_pre.t() @ x
        self.w1.bias.grad = grad_pre.sum(0)
        return grad_pre @ self.w1.weight


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
