"""Local training of the replicated model: steps, validation and throughput (no networking of its own)."""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import logging

import torch

from swarmtrain.averaging.base import ParameterAverager
from swarmtrain.dht.records import OptimizerSpec

logger = logging.getLogger(__name__)


def batch_to(batch, device: torch.device):
    """A copy of ``batch`` with every tensor moved to ``device`` (the same object on CPU)."""
    if device.type == "cpu":
        return batch
    changes = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **changes)


def build_optimizer(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The local optimizer named by the manifest (adam8bit is bitsandbytes' 8-bit Adam)."""
    params = [p for p in params if p.requires_grad]
    # fused: one kernel per step for all tensors (several times faster than the default on CPU)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, fused=True)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, fused=True)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.betas[0], weight_decay=spec.weight_decay)
    if spec.name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}")


@dataclass
class TrainerStats:
    steps: int = 0
    samples: int = 0
    skipped_steps: int = 0
    loss: Optional[float] = None  # EMA of the total training loss
    losses: dict = field(default_factory=dict)  # EMA per task
    samples_per_s: float = 0.0
    val_loss: Optional[float] = None
    val_loss_initial: Optional[float] = None
    val_losses: dict = field(default_factory=dict)


class Trainer:
    """Runs optimizer steps of ``model`` on batches from ``data`` and keeps running statistics.

    The optimizer step happens under ``lock`` so that the averager can read and update the same parameters
    between steps. A step whose loss is not finite is skipped (no update) and counted.
    """

    def __init__(self, model, data, optimizer: torch.optim.Optimizer, lock: threading.Lock,
                 averager: Optional[ParameterAverager], batch_size: int, seed: int, device: torch.device):
        self.model, self.data, self.optimizer, self.lock = model, data, optimizer, lock
        self.averager, self.batch_size, self.device = averager, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = TrainerStats()
        self._window_start: Optional[float] = None  # set when the first step starts
        self._window_samples = 0
        self._first_window = True  # until the first 2 s window closes, every step updates the rate
        self._evaluation: Optional[list] = None  # [batches left, loss sums, counts] of an evaluation in progress

    def step(self) -> dict[str, float]:
        """One training step; returns the task losses of this step."""
        if self._window_start is None:
            self._window_start = time.monotonic()
        batch = batch_to(self.data.sample(self.batch_size, self.generator), self.device)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            losses = self.model.losses(batch)
            total = self.model.total_loss(losses)
            values = {name: float(value.detach()) for name, value in losses.items()}
            if not math.isfinite(float(total.detach())):
                raise FloatingPointError(f"non-finite loss {float(total.detach())}")
            total.backward()
        except (FloatingPointError, ValueError) as e:  # NaN/Inf in the loss or in expert activations
            self.stats.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            logger.warning(f"skipped a training step: {e}")
            return {}
        with self.lock:
            self.optimizer.step()
        self.stats.steps += 1
        self.stats.samples += batch.num_samples()
        self._track(float(total.detach()), values, batch.num_samples())
        if self.averager is not None:
            self.averager.on_local_step(self.stats.steps, self.stats.samples)
        return values

    def evaluate(self, max_batches: int = 8) -> float:
        """Weighted validation loss (no auxiliary losses) on the fixed held-out split, all batches now."""
        self.begin_evaluation(max_batches)
        while not self.continue_evaluation():
            pass
        return self.stats.val_loss

    def begin_evaluation(self, max_batches: int = 8) -> None:
        """Start an evaluation to be run one validation batch per :meth:`continue_evaluation` call, between
        training steps: a whole evaluation (seconds on a busy CPU with remote experts) would stall training,
        and a stalled peer holds up the callers of its experts. The loss then mixes the models of a few
        consecutive steps, which moves far less than the loss between evaluations."""
        self._evaluation = [self.data.validation_batches(self.batch_size)[:max_batches], {}, {}]

    @property
    def evaluating(self) -> bool:
        return self._evaluation is not None

    @torch.no_grad()
    def continue_evaluation(self) -> bool:
        """Run the next batch of the evaluation in progress; True once it is complete (``stats.val_loss`` set).
        An exception (e.g. experts gone) abandons this evaluation and propagates."""
        if self._evaluation is None:
            raise RuntimeError("no evaluation in progress: call begin_evaluation() first")
        batches, totals, counts = self._evaluation  # modalities may run out of validation data at different batches
        if batches:
            self.model.eval()
            try:
                losses = self.model.losses(batch_to(batches.pop(0), self.device))
            except Exception:
                self._evaluation = None
                raise
            finally:
                self.model.train()
            losses.pop("moe_aux", None)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value)
                counts[name] = counts.get(name, 0) + 1
            if batches:
                return False
        self._evaluation = None
        per_task = {name: value / counts[name] for name, value in totals.items()}
        loss = float(self.model.total_loss({k: torch.tensor(v) for k, v in per_task.items()}))
        self.stats.val_loss, self.stats.val_losses = loss, per_task
        if self.stats.val_loss_initial is None:
            self.stats.val_loss_initial = loss
        return True

    def _track(self, total: float, values: dict[str, float], samples: int) -> None:
        decay = 0.9
        s = self.stats
        s.loss = total if s.loss is None else decay * s.loss + (1 - decay) * total
        for name, value in values.items():
            s.losses[name] = value if name not in s.losses else decay * s.losses[name] + (1 - decay) * value
        self._window_samples += samples
        elapsed = time.monotonic() - self._window_start
        if elapsed >= 2.0 or (self._first_window and elapsed > 0):
            # until the first 2 s window closes, report the rate so far (a peer that has stepped is never at 0)
            s.samples_per_s = self._window_samples / elapsed
        if elapsed >= 2.0:
            self._window_start, self._window_samples, self._first_window = time.monotonic(), 0, False
