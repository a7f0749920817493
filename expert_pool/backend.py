"""One hosted expert: its module, its optimizer, a lock, and load counters (no networking here).

:class:`ExpertBackend` implements the semantics of hivemind's ``ModuleBackend``: ``forward`` runs without
autograd; ``backward`` recomputes the forward with autograd, backpropagates the caller's output gradient, returns
the gradient w.r.t. the inputs and applies one optimizer step of this expert. ``forward_saving`` /
``backward_saved`` do the same without the recomputation, from activations kept between the two calls (see
:mod:`swarmtrain.expert_pool.activations`). A per-expert lock serialises
compute on one expert (so an optimizer step never interleaves with another call's forward), while different
experts run in parallel on the server's thread pool. Inputs must already be validated (see
:mod:`swarmtrain.expert_pool.server`).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Iterable, Mapping

import torch

from swarmtrain.dht.records import ExpertLoad, OptimizerSpec
from swarmtrain.expert_pool.expert import ExpertFFN

LOAD_TAU_S = 10.0  # time constant of the rows/s moving average published in the registry


def make_optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by the manifest: adam, adamw, sgd, or adam8bit (bitsandbytes.optim.Adam8bit)."""
    params = list(params)
    # fused Adam/AdamW: one kernel per step, ~5x faster than the default on CPU (a step per backward batch adds up)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, fused=True)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, fused=True)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adam8bit":
        import bitsandbytes

        return bitsandbytes.optim.Adam8bit(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}: expected adam, adamw, adam8bit or sgd")


def check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ValueError (naming ``what``) unless ``state`` holds exactly ``expected``'s names, each a tensor of the
    same shape with finite values (a state received from a peer or a checkpoint, before it replaces ours)."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{what} does not match: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{what}: {name} must have shape {tuple(expected[name].shape)}, got {got}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{what}: {name} has NaN or Inf values")


class ExpertBackend:
    """An expert this peer serves.

    :param uid: the expert's uid (``<modality>.<layer>.<index>``)
    :param module: the expert network (``ExpertFFN``)
    :param optimizer_spec: the manifest's optimizer; one step is applied per processed backward batch
    """

    def __init__(self, uid: str, module: ExpertFFN, optimizer_spec: OptimizerSpec):
        self.uid = uid
        self.module = module
        self.hidden = module.hidden
        self.optimizer = make_optimizer(optimizer_spec, module.parameters())
        self.lock = threading.Lock()
        self.calls = 0
        self.steps = 0
        self._step_pending = False  # gradients set by backward(step=False), waiting for step()
        self._rate = 0.0  # rows/s, exponentially decayed with LOAD_TAU_S
        self._rate_time = time.monotonic()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for rows ``x [rows, hidden]``, computed without autograd."""
        with self.lock, torch.no_grad():
            out = self.module(x)
            self._count(x.shape[0])
        return out

    def forward_saving(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Outputs for rows ``x`` and the activations :meth:`backward_saved` needs (``(x, pre)``)."""
        with self.lock:
            out, pre = self.module.forward_saving(x)
            self._count(x.shape[0])
        return out, (x, pre)

    def backward_saved(
        self, saved: tuple[torch.Tensor, ...], grad_out: torch.Tensor, step: bool = True
    ) -> torch.Tensor:
        """:meth:`backward` from the activations of :meth:`forward_saving` (no recomputed forward). If the
        parameters took optimizer steps since that forward, the gradient mixes the saved activations with the
        current weights, the usual approximation of asynchronous training (hivemind's recompute uses the current
        weights throughout)."""
        with self.lock:
            grad_x = self.module.backward_saved(*saved, grad_out)
            self._step_pending = True
            self._count(grad_out.shape[0])
        if step:
            self.step()
        return grad_x

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor, step: bool = True) -> torch.Tensor:
        """Gradient w.r.t. ``x`` of ``<module(x), grad_out>``; then one optimizer step on the same batch, right
        away, or with ``step=False`` when the caller calls :meth:`step` (after it has sent the gradient)."""
        with self.lock:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.module(x)
                grad_x, *grad_params = torch.autograd.grad(out, [x, *self.module.parameters()], grad_out)
            for param, grad in zip(self.module.parameters(), grad_params):
                param.grad = grad
            self._step_pending = True
            self._count(x.shape[0])
        if step:
            self.step()
        return grad_x

    def step(self) -> None:
        """Apply the optimizer step of the last :meth:`backward` (no-op if it was applied already)."""
        with self.lock:
            if not self._step_pending:
                return
            self._step_pending = False
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1

    def load(self) -> ExpertLoad:
        """Current load: rows/s moving average, calls served, optimizer steps applied."""
        with self.lock:
            rate = self._decayed_rate(time.monotonic())
            return ExpertLoad(load=max(rate, 0.0), calls=self.calls, version=self.steps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the expert's parameters."""
        with self.lock:
            return {name: value.detach().clone() for name, value in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the expert's parameters (strict: same names and shapes, finite values); resets the optimizer."""
        own = self.module.state_dict()
        check_state(own, state, f"state of {self.uid}")
        with self.lock:
            self.module.load_state_dict({name: value.to(own[name].dtype) for name, value in state.items()})
            self.optimizer.state.clear()

    def _count(self, rows: int) -> None:
        now = time.monotonic()
        self._rate = self._decayed_rate(now) + rows / LOAD_TAU_S
        self._rate_time = now
        self.calls += 1

    def _decayed_rate(self, now: float) -> float:
        return self._rate * math.exp(-(now - self._rate_time) / LOAD_TAU_S)
