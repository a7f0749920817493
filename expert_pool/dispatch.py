"""How a model's mixture-of-experts layer reaches its experts: the ExpertDispatcher interface.

The model (swarmtrain.peer.model) computes gate logits and top-k choices itself and hands the dispatcher the
token rows ``x [N, d]`` and the chosen expert indices ``[N, k]``; the dispatcher returns each row's output from
each chosen expert ``[N, k, d]`` plus a mask ``[N, k]`` of the (row, choice) pairs that were answered. Outputs
must be differentiable w.r.t. ``x``. Implementations:

* :class:`LocalDispatcher`: experts are modules in this process (tests, benchmarks' local baseline).
* :class:`swarmtrain.expert_pool.client.RemoteDispatcher`: experts live on peers across the swarm; one request per
  chosen expert per micro-batch, all in flight concurrently.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import torch

from swarmtrain.dht.uids import make_uid


class ExpertDispatcher(Protocol):
    def live_mask(self, modality: str, layer: int, num_experts: int) -> torch.Tensor:
        """Bool ``[num_experts]``: which experts of this (modality, layer) can be called right now."""

    def call_costs(self, modality: str, layer: int, num_experts: int) -> torch.Tensor:
        """Float ``[num_experts]`` in ``[0, 1]``: what calling each expert costs in communication (0: in-process,
        1: a slow or unmeasured link); the gate prefers cheap experts by this much (communication-aware routing)."""

    def dispatch(
        self, x: torch.Tensor, expert_idx: torch.Tensor, modality: str, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run rows of ``x [N, d]`` through experts ``expert_idx [N, k]``: (outputs [N, k, d], answered [N, k]).

        An index of -1 marks a choice dropped by the caller (capacity limit): it is not sent and not answered.
        """


class LocalDispatcher:
    """Experts held in this process, keyed by uid; every expert is always live."""

    def __init__(self, experts: Mapping[str, torch.nn.Module]):
        self.experts = dict(experts)

    def live_mask(self, modality: str, layer: int, num_experts: int) -> torch.Tensor:
        return torch.tensor([make_uid(modality, layer, i) in self.experts for i in range(num_experts)])

    def call_costs(self, modality: str, layer: int, num_experts: int) -> torch.Tensor:
        return torch.zeros(num_experts)  # every expert is in-process

    def dispatch(
        self, x: torch.Tensor, expert_idx: torch.Tensor, modality: str, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = expert_idx.shape
        flat_idx = expert_idx.reshape(-1)
        flat_rows = torch.arange(n, device=x.device).repeat_interleave(k)
        out = x.new_zeros(n * k, x.shape[-1])
        answered = torch.zeros(n * k, dtype=torch.bool, device=x.device)
        for expert in torch.unique(flat_idx).tolist():
            if expert < 0:  # dropped by the capacity limit
                continue
            uid = make_uid(modality, layer, expert)
            if uid not in self.experts:
                continue
            positions = (flat_idx == expert).nonzero(as_tuple=True)[0]
            out = out.index_copy(0, positions, self.experts[uid](x.index_select(0, flat_rows[positions])))
            answered[positions] = True
        return out.view(n, k, -1), answered.view(n, k)
