"""The arithmetic of one pairwise exchange: mixing coefficients, staleness scaling, outlier bounds, outer optimizer.

Everything here is a pure function of numbers and tensors, so the update rule can be checked by hand
(tests/test_averaging.py does). The protocol that feeds these functions lives in
:mod:`swarmtrain.averaging.gossip`.

Pairwise push-sum mixing (Kempe et al. 2003, "Gossip-based computation of aggregate information"; Assran et al.
2019, "Stochastic Gradient Push"): every peer holds a weight ``w`` beside its parameters ``x``; an exchange
between ``s`` and ``p`` with mixing factor ``beta = factor / 2`` applies the column-stochastic matrix
``[[1-beta, beta], [beta, 1-beta]]`` to both ``w`` and ``w * x``. Hence ``sum(w)`` and ``sum(w * x)`` over the
swarm never change, whatever ``factor`` each exchange uses and whichever pairs meet, and every ``x`` converges to
the weighted average ``sum(w * x) / sum(w)``: the true average of the swarm's mass, also after a peer has left
(its mass leaves with it; nobody else is biased by an exchange it did not finish).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def staleness_scale(tau: int) -> float:
    """``s(tau) = 1 / sqrt(1 + tau)``: how much of an exchange to apply when ``tau`` local steps happened since
    the snapshot it was computed from (stale-synchronous scaling as in Zhang et al. 2016, "Staleness-aware
    async-SGD", with the gentler square root)."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return 1.0 / math.sqrt(1.0 + tau)


def mixing(weight_self: float, weight_other: float, factor: float) -> tuple[float, float]:
    """(alpha, new weight) for one side of a push-sum exchange with mixing ``factor`` in [0, 1].

    The side moves ``x_self += alpha * (x_other - x_self)``; with ``factor = 1`` and equal weights that is the
    plain pair average (alpha = 1/2).
    """
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"mixing factor must be in [0, 1], got {factor}")
    if not (weight_self > 0 and weight_other > 0):
        raise ValueError(f"push-sum weights must be positive, got {weight_self} and {weight_other}")
    beta = 0.5 * factor
    new_weight = (1.0 - beta) * weight_self + beta * weight_other
    return beta * weight_other / new_weight, new_weight


def clip_factor(distance: float, clip: Optional[float]) -> float:
    """CenteredClip-style scale for a partner at L2 ``distance``: ``min(1, clip / distance)`` (1 if no clip).

    Karimireddy et al. 2021, "Learning from history for Byzantine robust optimization": the pair moves toward the
    partner by at most ``clip`` in L2 norm, so one corrupted partner can shift us only by a bounded amount.
    """
    if clip is None or distance <= clip:
        return 1.0
    return clip / distance


def is_outlier(distance: float, own_norm: float, other_norm: float, max_rel_distance: float) -> bool:
    """Whether a partner at ``distance`` is too far to average with: farther than ``max_rel_distance`` times
    the larger of the two parameter norms (plus a tiny floor for all-zero parameters)."""
    return distance > max_rel_distance * max(own_norm, other_norm, 1e-12)


class OuterNesterov:
    """DiLoCo's outer optimizer (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models"): SGD with Nesterov momentum on pseudo-gradients ``outer - averaged``.

    ``outer`` is the parameter vector as of the last outer step. Given the pair-averaged parameters ``target``,
    ``g = outer - target``, ``m = mu * m + g``, ``outer -= lr * (g + mu * m)``; the caller then moves its live
    parameters by ``outer_new - snapshot``, keeping local progress made since the snapshot. With ``lr = 1``
    and ``mu = 0`` this is plain averaging.
    """

    def __init__(self, initial: torch.Tensor, lr: float = 0.7, momentum: float = 0.9):
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"outer optimizer needs lr > 0 and 0 <= momentum < 1, got lr={lr} momentum={momentum}")
        self.outer = initial.detach().to(torch.float32).clone()
        self.momentum_buffer = torch.zeros_like(self.outer)
        self.lr, self.mu = lr, momentum

    def step(self, target: torch.Tensor) -> torch.Tensor:
        """One outer step toward ``target``; returns the new outer parameters (owned by this object)."""
        if target.shape != self.outer.shape:
            raise ValueError(f"outer step got {tuple(target.shape)}, expected {tuple(self.outer.shape)}")
        grad = self.outer - target
        self.momentum_buffer.mul_(self.mu).add_(grad)
        self.outer.sub_(grad.add_(self.momentum_buffer, alpha=self.mu), alpha=self.lr)
        return self.outer
