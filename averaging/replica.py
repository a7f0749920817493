"""This peer's side of an exchange: its parameters, lock, codec state, push-sum weight and outer optimizer.

Everything that reads or writes the trainer's parameters goes through :class:`LocalReplica`, always under the
trainer's lock and only for one chunk at a time, on a small thread pool (never on the node's event loop, which
also serves other peers). Not for: talking to peers (:mod:`swarmtrain.averaging.exchange`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from typing import Callable, Optional, Sequence

import torch
from hivemind.proto import runtime_pb2

from swarmtrain.averaging import rules
from swarmtrain.averaging.blockwise import Scratch
from swarmtrain.averaging.codec import (
    SMALL_TENSOR, ErrorFeedback, LocalDataError, Segment, WireError, decode, encode, plan_segments,
)
from swarmtrain.averaging.flat import FlatParams
from swarmtrain.averaging.references import PairReferences
from swarmtrain.dht.records import AveragingSpec


SAMPLE_SIZE = 4096  # elements sampled to estimate the distance to a partner before sending our values
PRECISION_MARGIN = 8.0  # float16 values when the partner is closer than this many 8-bit quantization errors
RELATIVE_MAX = 0.5  # send differences from a shared reference only while |x - R| < this x |x| (on the sample)


class LocalReplica:
    """The local parameters as the averaging protocol sees them.

    :param params: the trainer's tensors (updated in place)
    :param lock: the trainer's lock; held here only around one chunk's copy or addition
    :param spec: codec, chunking, staleness and outlier settings
    :param name: for thread names
    """

    def __init__(self, params: Sequence[torch.Tensor], lock: threading.Lock, spec: AveragingSpec, name: str):
        self.flat = FlatParams(wire_order(params))
        if self.flat.numel == 0:
            raise ValueError("averaging needs at least one parameter element")
        self.lock, self.spec = lock, spec
        self._plans: dict[tuple, list[Segment]] = {}
        self.segments = self.plan(spec.codec, spec.chunk_elems, spec.blocksize)
        self.feedback = ErrorFeedback(self.flat.numel)
        self.weight = 1.0  # push-sum weight (rules.mixing)
        self.version = 0  # exchanges applied so far: with the trainer's step, says whether our values changed
        self.q8_rel = 0.013  # last measured relative L2 error of our values under 8-bit blockwise encoding
        m = min(SAMPLE_SIZE, self.flat.numel)  # evenly spread elements for estimating distances cheaply
        self.sample_indices = torch.arange(m, dtype=torch.int64) * self.flat.numel // m
        self.outer: Optional[rules.OuterNesterov] = None  # diloco mode only, see start_outer
        self.references = PairReferences(self.flat.numel, spec.reference_partners if spec.codec == "8bit" else 0)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"avg-{name}")
        self._scratches = threading.local()
        if spec.codec == "8bit":
            encode(torch.zeros(spec.blocksize), "8bit", spec.blocksize)  # load bitsandbytes now, not mid-exchange

    @property
    def numel(self) -> int:
        return self.flat.numel

    @property
    def layout(self) -> str:
        return self.flat.layout

    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the replica's thread pool (tensor work stays off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def start_outer(self) -> None:
        """Diloco mode: remember the current parameters as the outer optimizer's starting point."""
        if self.spec.mode == "diloco" and self.outer is None:
            self.outer = rules.OuterNesterov(self.snapshot(), self.spec.outer_lr, self.spec.outer_momentum)

    @property
    def needs_snapshot(self) -> bool:
        """Whether an exchange must keep the values it was computed from (diloco mode, "overwrite" rule)."""
        return self.outer is not None or self.spec.rule == "overwrite"

    def snapshot(self) -> torch.Tensor:
        """A float32 copy of all parameters, taken in one lock acquisition (consistent across tensors)."""
        with self.lock:
            return self.flat.read()

    def load(self, state: torch.Tensor) -> None:
        """Overwrite all parameters with ``state`` (one lock acquisition)."""
        with self.lock:
            self.flat.copy_(state)
        self.version += 1  # our values changed: no partner may treat us as "unchanged"
        if self.outer is not None:
            self.outer = rules.OuterNesterov(state, self.spec.outer_lr, self.spec.outer_momentum)

    def plan(self, codec: str, chunk_elems: int, blocksize: int) -> list[Segment]:
        """The wire segments of our layout for a partner's settings (raises ValueError if unsupported)."""
        key = (codec, chunk_elems, blocksize)
        if key not in self._plans:
            self._plans[key] = plan_segments([p.numel() for p in self.flat.params], codec, chunk_elems, blocksize)
        return self._plans[key]

    def sample(self) -> torch.Tensor:
        """Our values at ``sample_indices`` (sent with "accept", so the initiator can estimate the distance)."""
        with self.lock:
            return self.flat.gather(self.sample_indices)

    def precise_values(self, partner_sample: torch.Tensor) -> bool:
        """Codec "8bit": whether to send our values as float16 this time. Yes when the partner is within
        ``PRECISION_MARGIN`` times our 8-bit quantization error (estimated from the samples): then 8-bit values
        would keep the pair about that error apart; the differences the partner answers stay 8-bit."""
        if (self.spec.codec != "8bit" or not self.spec.adaptive_precision
                or partner_sample.numel() != self.sample_indices.numel()):
            return False
        ours = self.sample()
        scale = self.flat.numel / max(1, ours.numel())
        distance = math.sqrt(scale * float(torch.sum((ours - partner_sample) ** 2)))
        norm = math.sqrt(scale * float(torch.dot(ours, ours)))
        return distance < PRECISION_MARGIN * self.q8_rel * norm

    def value_codec(self, segment: Segment, precise: bool) -> str:
        """How the initiator encodes its values for ``segment`` (float16 instead of 8-bit when ``precise``)."""
        return "fp16" if segment.codec == "8bit" and precise else segment.codec

    def worth_relative(self, reference: torch.Tensor) -> bool:
        """Whether differences from ``reference`` are much smaller than our values (on the sampled elements), so
        that 8-bit differences beat 8-bit values."""
        ours = self.sample()
        ref = reference.index_select(0, self.sample_indices)
        return float(torch.sum((ours - ref) ** 2)) < RELATIVE_MAX**2 * float(torch.dot(ours, ours))

    def encode_own(self, segment: Segment, codec: str, reference: Optional[torch.Tensor] = None):
        """Initiator: (message, our values x, what the partner decodes, ||x||^2, ||A||^2, squared encoding
        error) for ``segment``, with error feedback for lossy codecs. With ``reference`` (an 8-bit segment, a
        reference shared with the partner) the message holds ``Q8(x - R)`` and the partner decodes ``R + that``.
        Raises LocalDataError if our values are not finite."""
        with self.lock:
            x = self.flat.read(segment.lo, segment.hi)
        own_sq = _checked_sq_norm(x)
        if codec == "none":
            message, _ = encode(x, "none")
            return message, x, x, own_sq, own_sq, 0.0
        if reference is not None:
            ref = reference[segment.lo : segment.hi]
            message, decoded = encode(x - ref, codec, self.spec.blocksize, check_finite=False,
                                      scratch=self._scratch(), entropy=self.spec.entropy_coding)
            decoded.add_(ref)  # = R + decoded, the partner's very operation
            if self.spec.error_feedback:
                self.feedback.skip(segment.lo, segment.hi - segment.lo)
            return message, x, decoded, own_sq, float(torch.dot(decoded, decoded)), 0.0
        if not self.spec.error_feedback:
            message, decoded = encode(x, codec, self.spec.blocksize, check_finite=False, scratch=self._scratch(),
                                      entropy=self.spec.entropy_coding)
            err_sq = float(torch.sum((x - decoded) ** 2)) if self.spec.adaptive_precision else 0.0
            return message, x, decoded, own_sq, float(torch.dot(decoded, decoded)), err_sq
        meant = self.feedback.compensate(segment.lo, x)
        message, decoded = encode(meant, codec, self.spec.blocksize, check_finite=False, scratch=self._scratch(),
                                  entropy=self.spec.entropy_coding)
        err_sq = self.feedback.update(segment.lo, meant, decoded)
        return message, x, decoded, own_sq, float(torch.dot(decoded, decoded)), err_sq

    def answer_chunk(self, tensor: runtime_pb2.Tensor, segment: Segment, blocksize: int,
                     reference: Optional[torch.Tensor] = None):
        """Partner: decode the initiator's values ``a`` for ``segment`` (``R + decoded`` when the chunk is a
        difference from the ``reference`` we share) and answer with the segment's codec: ``b = x - a`` (mode
        "d"), or our values ``x`` themselves (mode "v") when the pair is farther apart than ``x`` is large (then
        an 8-bit ``x`` loses less than an 8-bit ``b``). Returns (reply, mode, our x, the move ``d`` both sides
        apply (decoded ``b``, or decoded ``x`` minus ``a``), ||x||^2, ||a||^2, ``a``). Raises WireError on bad
        input, LocalDataError if our own values are not finite."""
        theirs, codec = decode(tensor, segment.hi - segment.lo, blocksize)
        if reference is not None:
            if codec != "8bit" or segment.codec != "8bit":
                raise WireError(f"a difference from the shared reference must be 8-bit, got {codec}")
            theirs.add_(reference[segment.lo : segment.hi])
            if not bool(torch.isfinite(theirs.sum())):
                raise WireError(f"chunk at {segment.lo} holds values beyond float32 range")
        with self.lock:
            x = self.flat.read(segment.lo, segment.hi)
        own_sq = _checked_sq_norm(x)
        b = x - theirs
        a_sq = float(torch.dot(theirs, theirs))
        if segment.codec == "8bit" and float(torch.dot(b, b)) > own_sq:
            reply, decoded = encode(x, segment.codec, blocksize, check_finite=False, scratch=self._scratch(),
                                    entropy=self.spec.entropy_coding)
            return reply, "v", x, decoded.sub_(theirs), own_sq, a_sq, theirs
        reply, decoded = encode(b, segment.codec, blocksize, check_finite=False, scratch=self._scratch(),
                                entropy=self.spec.entropy_coding)
        return reply, "d", x, decoded, own_sq, a_sq, theirs

    def remember_pair(self, peer: str, token: int, sent: dict[int, torch.Tensor], move: torch.Tensor) -> None:
        """Initiator: keep the reference shared with ``peer`` from what the partner decoded of our values (``sent``,
        per segment) and the move both applied (the partner stores the same from its side)."""
        values = torch.cat([sent[segment.lo] for segment in self.segments])
        self.references.store(peer, token, values, move)

    def after_exchange(self, ok: bool, own_norm: float = 0.0, q8_err: Optional[float] = None) -> None:
        """Initiator bookkeeping: keep or drop the error-feedback residuals; remember the 8-bit error."""
        if not ok:
            self.feedback.discard()
            return
        self.feedback.commit()
        if q8_err is not None and own_norm > 0:
            self.q8_rel = q8_err / own_norm

    def commit_factor(self, tau: int, distance: float, own_norm: float, sent_norm: float):
        """Initiator: (mixing factor, None) or (0, reason to abort) for a partner at L2 ``distance``."""
        if tau > self.spec.max_staleness:
            return 0.0, "stale"
        if rules.is_outlier(distance, own_norm, sent_norm, self.spec.max_rel_distance):
            return 0.0, f"outlier: partner is {distance:.3g} away, our norm is {own_norm:.3g}"
        factor = rules.staleness_scale(tau) if self.spec.staleness_scaling else 1.0
        clip = None if self.spec.clip_rel is None else self.spec.clip_rel * max(own_norm, 1e-12)
        return factor * rules.clip_factor(distance, clip), None

    def apply(self, delta: torch.Tensor, snapshot: Optional[torch.Tensor], alpha: float = 1.0) -> None:
        """Add the pair-averaging move ``alpha * delta`` to the live parameters, chunk by chunk under the lock (so
        the trainer never waits long); in diloco mode move to the outer optimizer's new point instead, relative
        to the values ``snapshot`` the exchange was computed from. With ``spec.rule == "overwrite"`` the
        parameters are *set* to ``snapshot + alpha * delta`` instead (naive averaging without delay
        compensation: whatever the trainer did since the snapshot is lost)."""
        if self.needs_snapshot and snapshot is None:
            raise ValueError(f"{self.spec.mode} mode with rule {self.spec.rule!r} needs the exchange's snapshot")
        if self.outer is not None:
            delta, alpha = self.outer.step(snapshot + alpha * delta) - snapshot, 1.0
        step = self.spec.chunk_elems
        for lo in range(0, self.flat.numel, step):
            with self.lock:
                if self.spec.rule == "overwrite":
                    target = snapshot[lo : lo + step] + alpha * delta[lo : lo + step]
                    self.flat.add_(lo, target.sub_(self.flat.read(lo, lo + target.numel())))
                else:
                    self.flat.add_(lo, delta[lo : lo + step], alpha=alpha)

    def apply_mixing(self, received: torch.Tensor, other_weight: float, factor: float, sign: float,
                     snapshot: Optional[torch.Tensor]) -> None:
        """One side's half of a push-sum exchange: move toward the partner by ``alpha * received`` (``sign``
        +1 for the initiator, whose ``received`` is ``x_p - x_s``; -1 for the partner) and update the weight,
        in one call so that nothing can separate the two."""
        alpha, new_weight = rules.mixing(self.weight, other_weight, factor)
        self.apply(received, snapshot, alpha=sign * alpha)
        self.weight = new_weight
        self.version += 1

    def _scratch(self) -> Scratch:
        """This thread's reusable encoding buffer."""
        scratch = getattr(self._scratches, "scratch", None)
        if scratch is None:
            scratch = self._scratches.scratch = Scratch()
        return scratch

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def wire_order(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` with the tensors of at least SMALL_TENSOR elements first (stable): consecutive large tensors
    then share 8-bit wire segments and all small ones one float16 run (see plan_segments). Every peer orders
    the same model the same way; the layout hash covers the order."""
    params = list(params)
    return [p for p in params if p.numel() >= SMALL_TENSOR] + [p for p in params if p.numel() < SMALL_TENSOR]


def _checked_sq_norm(x: torch.Tensor) -> float:
    """``||x||^2``, which is also the finiteness check of ``x`` before lossy encoding (one pass for both)."""
    value = float(torch.dot(x, x))
    if not math.isfinite(value):
        raise LocalDataError(f"our {x.numel()} values hold NaN, Inf or values too large to average")
    return value
