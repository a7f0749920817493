"""The multimodal mixture-of-experts transformer that every peer trains (nanoGPT-style, one readable file).

Each modality is encoded to ``hidden``-sized tokens (:mod:`swarmtrain.peer.encoders`), then every stream
(text, image, caption, audio) goes through ``model.layers`` pre-norm blocks::

    x = x + Attn(LN_1(x))          # shared by all modalities; causal for text and captions
    x = x + MoE_m(LN_2(x))         # m = the stream's modality; experts live on peers across the swarm

and ends in per-task heads: next-byte prediction, image classification, image<->caption contrastive matching and
audio classification. All parameters of :class:`SwarmModel` are *replicated* (every peer holds a copy and gossip
averaging keeps the copies together); the experts are not parameters here: the MoE layer computes its gate, picks
the top-k live experts and reaches them through an :class:`~swarmtrain.expert_pool.dispatch.ExpertDispatcher`.
Not for: optimisation, averaging or networking (see swarmtrain.peer's trainer, swarmtrain.averaging,
swarmtrain.expert_pool).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from swarmtrain.dht.records import MODALITIES, Manifest, ModelSpec
from swarmtrain.expert_pool.dispatch import ExpertDispatcher
from swarmtrain.peer.data import Batch
from swarmtrain.peer.encoders import AudioEncoder, ImageEncoder, TextEncoder

BALANCE_COEF = 0.01  # Switch Transformer load-balancing loss weight (alpha)
Z_LOSS_COEF = 1e-3  # router z-loss weight (ST-MoE)
MAX_LOGIT_SCALE = math.log(100.0)


class SwarmModel(nn.Module):
    """The replicated part of the swarm's model, built deterministically from the run manifest.

    Args:
        manifest: the run manifest; sizes come from ``manifest.model``, the number of experts per (modality, layer)
            from ``manifest.experts_per_layer``, ``top_k`` / ``k_min`` from ``manifest.expert_pool`` and the
            initial weights from ``manifest.seed`` (identical on every peer; the global RNG is left untouched).
            Initialisation is PyTorch's default for every layer (as for the experts), with unit-variance
            embeddings, CLS token and positions: token inputs then start at the scale of the expert outputs
            instead of being drowned by them, which lets the image path learn within tens of steps. The LM head is
            untied from the byte embedding for the same reason (a tied head needs a tiny embedding).
        dispatcher: how the MoE layers reach experts; stored as ``model.dispatcher`` and may be replaced.

    Example::

        experts = {uid: make_expert(uid, spec.hidden, spec.expert_ffn, manifest.seed) for uid in manifest.expert_uids()}
        model = SwarmModel(manifest, LocalDispatcher(experts))
        losses = model.losses(batch)            # {"text": ..., "image": ..., "contrastive": ..., "moe_aux": ...}
        model.total_loss(losses).backward()
    """

    def __init__(self, manifest: Manifest, dispatcher: ExpertDispatcher):
        super().__init__()
        self.manifest, self.dispatcher = manifest, dispatcher
        spec = manifest.model
        self.modalities = tuple(m for m in MODALITIES if m in manifest.modalities)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(manifest.seed)
            self.encoders = nn.ModuleDict()
            if "text" in self.modalities:
                self.encoders["text"] = TextEncoder(spec)
            if "image" in self.modalities:
                self.encoders["image"] = ImageEncoder(spec)
            if "audio" in self.modalities:
                self.encoders["audio"] = AudioEncoder(spec)
            experts = {m: manifest.experts_per_layer[m] for m in self.modalities}
            self.blocks = nn.ModuleList(
                Block(spec, layer, experts, manifest.expert_pool.top_k, manifest.expert_pool.k_min,
                      manifest.expert_pool.capacity_factor, manifest.expert_pool.comm_cost_weight)
                for layer in range(spec.layers)
            )
            self.ln_f = nn.LayerNorm(spec.hidden)
            if "text" in self.modalities:
                self.lm_head = nn.Linear(spec.hidden, spec.text_vocab, bias=False)
            if "image" in self.modalities:
                self.image_head = nn.Linear(spec.hidden, spec.num_classes)
            if "image" in self.modalities and "text" in self.modalities:
                self.image_proj = nn.Linear(spec.hidden, spec.contrastive_dim, bias=False)
                self.caption_proj = nn.Linear(spec.hidden, spec.contrastive_dim, bias=False)
                self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            if "audio" in self.modalities:
                self.audio_head = nn.Linear(spec.hidden, spec.num_classes)

    def __setattr__(self, name: str, value) -> None:
        if name == "dispatcher":  # a plain attribute even if it is an nn.Module: experts are not our parameters
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Same as :meth:`losses`."""
        return self.losses(batch)

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-task losses of one batch; keys only for the modalities present, plus ``moe_aux`` (router losses).

        Keys: ``text`` (next-byte CE), ``image`` (classification CE), ``contrastive`` (image<->caption InfoNCE, when
        the batch has captions), ``audio`` (classification CE), ``moe_aux`` (load balance + z-loss, all MoE layers).
        """
        h, moe_aux = self.features(batch)
        losses: dict[str, torch.Tensor] = {}
        if "text" in h:
            logits = self.lm_head(h["text"])
            losses["text"] = F.cross_entropy(logits.flatten(0, 1), batch.text[:, 1:].flatten())
        if "image" in h:
            losses["image"] = F.cross_entropy(self.image_head(h["image"][:, 0]), batch.image_labels)
        if "caption" in h:
            mask = batch.caption_mask.unsqueeze(-1).float()
            caption = (h["caption"] * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            losses["contrastive"] = self._contrastive(h["image"][:, 0], caption, batch.image_labels)
        if "audio" in h:
            losses["audio"] = F.cross_entropy(self.audio_head(h["audio"].mean(1)), batch.audio_labels)
        losses["moe_aux"] = moe_aux
        return losses

    def features(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Final-norm hidden states ``[B, T, d]`` per stream (``text``, ``image``, ``caption``, ``audio``; only those
        in the batch) and the summed MoE router loss. Image position 0 is the CLS token."""
        streams = self._encode(batch)
        moe_aux = torch.zeros((), device=streams[0].x.device)
        for block in self.blocks:
            moe_aux = moe_aux + block(streams, self.dispatcher)
        return {s.name: self.ln_f(s.x) for s in streams}, moe_aux

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_task w_task * loss_task + moe_aux`` with ``w`` from ``manifest.training.loss_weights`` (default 1)."""
        weights = self.manifest.training.loss_weights
        unknown = set(losses) - {"text", "image", "contrastive", "audio", "moe_aux"}
        if unknown or not losses:
            raise ValueError(f"total_loss expects the dict from SwarmModel.losses, got keys {sorted(losses)}")
        return sum(loss if name == "moe_aux" else weights.get(name, 1.0) * loss for name, loss in losses.items())

    def _contrastive(self, image: torch.Tensor, caption: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE; captions repeat across the batch, so every same-label pair is a positive."""
        img = F.normalize(self.image_proj(image), dim=-1)
        txt = F.normalize(self.caption_proj(caption), dim=-1)
        logits = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * img @ txt.T  # [B, B]
        positives = (labels[:, None] == labels[None, :]).float()
        targets = positives / positives.sum(1, keepdim=True)  # symmetric matrix: same targets both ways
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def _encode(self, batch: Batch) -> list["Stream"]:
        """Check the batch against the manifest and embed each present input as a token stream."""
        _check_batch(batch, self.modalities, self.manifest.model.num_classes)
        streams = []
        if batch.text is not None:
            streams.append(Stream("text", "text", self.encoders["text"](batch.text[:, :-1]), causal=True))
        if batch.images is not None:
            streams.append(Stream("image", "image", self.encoders["image"](batch.images), causal=False))
        if batch.captions is not None:
            x = self.encoders["text"](batch.captions)
            streams.append(Stream("caption", "text", x, causal=True, valid=batch.caption_mask.bool()))
        if batch.audio is not None:
            streams.append(Stream("audio", "audio", self.encoders["audio"](batch.audio), causal=False))
        return streams


@dataclass
class Stream:
    """One sequence of tokens flowing through the trunk: ``x [B, T, d]``; ``valid [B, T]`` marks non-padding."""

    name: str
    modality: str
    x: torch.Tensor
    causal: bool
    valid: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm transformer block: shared causal/bidirectional self-attention, then a per-modality MoE FFN."""

    def __init__(self, spec: ModelSpec, layer: int, experts: dict[str, int], top_k: int, k_min: int,
                 capacity_factor: Optional[float] = None, comm_cost_weight: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.hidden)
        self.attn = SelfAttention(spec.hidden, spec.heads)
        self.ln_2 = nn.LayerNorm(spec.hidden)
        self.moe = nn.ModuleDict(
            {m: MoE(spec.hidden, m, layer, n, top_k, k_min, capacity_factor, comm_cost_weight)
             for m, n in experts.items()}
        )

    def forward(self, streams: list[Stream], dispatcher: ExpertDispatcher) -> torch.Tensor:
        """Advance every stream's ``x`` (the Stream objects are updated); return this block's MoE router loss."""
        for s in streams:
            s.x = s.x + self.attn(self.ln_1(s.x), causal=s.causal)
        aux = torch.zeros((), device=streams[0].x.device)
        for modality, moe in self.moe.items():
            group = [s for s in streams if s.modality == modality]
            if not group:
                continue
            # one dispatch per (modality, layer): the non-padding tokens of all its streams as rows [N, d]
            rows, where = _gather_rows([self.ln_2(s.x) for s in group], [s.valid for s in group])
            out, layer_aux = moe(rows, dispatcher)
            for s, delta in zip(group, _scatter_rows(out, where)):
                s.x = s.x + delta
            aux = aux + layer_aux
        return aux


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, T, d_h]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MoE(nn.Module):
    """Top-k gated mixture of the ``num_experts`` experts of one (modality, layer).

    ``g = softmax over the top-k of gate(x)`` among live experts; ``y = sum_k g_k E_k(x)``, where only answered
    (row, expert) pairs count and their weights are renormalised (a row with no answer gets ``y = 0``).
    """

    def __init__(self, hidden: int, modality: str, layer: int, num_experts: int, top_k: int, k_min: int,
                 capacity_factor: Optional[float] = None, comm_cost_weight: float = 0.0):
        super().__init__()
        self.modality, self.layer, self.num_experts, self.top_k, self.k_min = modality, layer, num_experts, top_k, k_min
        self.capacity_factor = capacity_factor
        self.comm_cost_weight = comm_cost_weight
        self.gate = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x: torch.Tensor, dispatcher: ExpertDispatcher) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, d]`` -> (``y [N, d]``, auxiliary router loss)."""
        live = self._live(dispatcher, x.device)
        logits = self.gate(x).masked_fill(~live, float("-inf"))  # [N, E]
        k = min(self.top_k, int(live.sum()))
        idx = self._choose(logits, k, dispatcher)  # [N, k]
        weights = logits.gather(-1, idx).softmax(dim=-1)

        sent = self._within_capacity(idx, int(live.sum()))
        out, answered = dispatcher.dispatch(x, idx.masked_fill(~sent, -1), self.modality, self.layer)
        if out.shape != (*idx.shape, x.shape[1]) or answered.shape != idx.shape:
            raise RuntimeError(f"{type(dispatcher).__name__}.dispatch returned outputs {tuple(out.shape)} and mask "
                               f"{tuple(answered.shape)} for {tuple(idx.shape)} choices of {x.shape[1]}-wide rows")
        answered = answered.to(x.device, torch.bool) & sent
        weights = weights * answered
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.zeros_like(weights))
        out = out.to(x.dtype).masked_fill(~answered.unsqueeze(-1), 0.0)  # unanswered slots may hold anything
        y = (weights.unsqueeze(-1) * out).sum(dim=1)
        return y, self._router_loss(logits, idx, live)

    def _choose(self, logits: torch.Tensor, k: int, dispatcher: ExpertDispatcher) -> torch.Tensor:
        """Top-k experts of each row by ``logits - comm_cost_weight * call cost`` (communication-aware routing:
        min E[sum_i rho_i CommCost(i)] traded against the gate's preference). Only the choice is biased: the
        weights of the chosen experts and the load-balance loss use the gate's own logits, and as every peer
        prefers the experts *it* hosts, the swarm-wide load stays spread over all experts."""
        if self.comm_cost_weight > 0:
            costs = torch.as_tensor(dispatcher.call_costs(self.modality, self.layer, self.num_experts))
            if costs.shape != (self.num_experts,):
                raise ValueError(f"call_costs({self.modality!r}, {self.layer}) must have shape [{self.num_experts}], "
                                 f"got {tuple(costs.shape)}")
            logits = logits - self.comm_cost_weight * costs.to(logits.device, logits.dtype)
        return logits.detach().topk(k, dim=-1).indices

    def _within_capacity(self, idx: torch.Tensor, live_experts: int) -> torch.Tensor:
        """Bool ``[N, k]``: the choices each expert takes, at most ``capacity_factor * N * k / live`` of them.

        Choices queue per expert in priority order, all first choices before any second choice (as in GShard /
        Switch), so an overloaded expert drops the rows for which it was a later choice first.
        """
        if self.capacity_factor is None or idx.numel() == 0:
            return torch.ones_like(idx, dtype=torch.bool)
        n, k = idx.shape
        capacity = math.ceil(self.capacity_factor * n * k / max(1, live_experts))
        by_priority = idx.t().reshape(-1)  # [k * N], choice-major
        onehot = F.one_hot(by_priority, self.num_experts)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # place in its expert's queue
        return (position < capacity).view(k, n).t()

    def _live(self, dispatcher: ExpertDispatcher, device: torch.device) -> torch.Tensor:
        live = torch.as_tensor(dispatcher.live_mask(self.modality, self.layer, self.num_experts))
        if live.shape != (self.num_experts,):
            raise ValueError(f"live_mask({self.modality!r}, {self.layer}) must have shape [{self.num_experts}], "
                             f"got {tuple(live.shape)}")
        live = live.to(device, torch.bool)
        if int(live.sum()) < self.k_min:
            raise RuntimeError(
                f"only {int(live.sum())} of {self.num_experts} {self.modality} experts of layer {self.layer} are "
                f"live, fewer than expert_pool.k_min={self.k_min}: wait for more peers to host them"
            )
        return live

    def _router_loss(self, logits: torch.Tensor, idx: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Switch load balance ``alpha * E_live * sum_i f_i P_i`` plus z-loss ``mean(logsumexp(logits)^2)``."""
        if logits.shape[0] == 0:
            return logits.new_zeros(())
        probs = logits.softmax(dim=-1)  # dead experts get probability 0
        routed = F.one_hot(idx, self.num_experts).float().sum(dim=(0, 1)) / idx.numel()  # f_i: share of assignments
        balance = int(live.sum()) * (routed * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return BALANCE_COEF * balance + Z_LOSS_COEF * z


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (a parameter shared by several modules counts once)."""
    return sum(p.numel() for p in model.parameters())


def _gather_rows(xs: list[torch.Tensor], valid: list[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    """Flatten ``[B, T, d]`` streams to rows ``[N, d]`` (dropping padding); remember where each row came from."""
    rows, where = [], []
    for x, mask in zip(xs, valid):
        flat = x.reshape(-1, x.shape[-1])
        index = None if mask is None else mask.reshape(-1).nonzero(as_tuple=True)[0]
        rows.append(flat if index is None else flat.index_select(0, index))
        where.append((x.shape, index, rows[-1].shape[0]))
    return torch.cat(rows), where


def _scatter_rows(out: torch.Tensor, where: list) -> list[torch.Tensor]:
    """Inverse of :func:`_gather_rows`: back to ``[B, T, d]`` per stream, zeros at padding."""
    results, start = [], 0
    for shape, index, count in where:
        chunk = out[start : start + count]
        start += count
        if index is not None:
            chunk = out.new_zeros(shape[0] * shape[1], shape[2]).index_copy(0, index, chunk)
        results.append(chunk.view(shape))
    return results


def _check_batch(batch: Batch, modalities: tuple[str, ...], num_classes: int) -> None:
    """Raise ValueError when the batch is empty, inconsistent, or holds a modality the run does not train."""
    present = {
        "text": batch.text is not None,
        "image": batch.images is not None,
        "audio": batch.audio is not None,
    }
    if not any(present.values()):
        raise ValueError("batch holds no text, images or audio")
    for modality, has in present.items():
        if has and modality not in modalities:
            raise ValueError(f"batch holds {modality} but the run's modalities are {list(modalities)}")
    if batch.text is not None and (batch.text.dim() != 2 or batch.text.shape[1] < 2):
        raise ValueError(f"text must be [batch, T + 1] with T >= 1, got {tuple(batch.text.shape)}")
    if batch.images is not None:
        _check_labels(batch.image_labels, batch.images, "image_labels", "images", num_classes)
    if batch.captions is not None:
        if batch.images is None or "text" not in modalities:
            raise ValueError("captions need images in the batch and 'text' among the run's modalities")
        mask = batch.caption_mask
        if mask is None or mask.shape != batch.captions.shape:
            raise ValueError("captions need a caption_mask of the same shape")
        if (mask[:, 1:].bool() & ~mask[:, :-1].bool()).any():
            raise ValueError("caption_mask must mark a prefix of each caption (padding only at the end)")
        if batch.captions.shape[0] != batch.images.shape[0]:
            raise ValueError(f"{batch.captions.shape[0]} captions for {batch.images.shape[0]} images")
    if batch.audio is not None:
        _check_labels(batch.audio_labels, batch.audio, "audio_labels", "audio", num_classes)


def _check_labels(labels: torch.Tensor | None, inputs: torch.Tensor, name: str, what: str, num_classes: int) -> None:
    if labels is None or labels.shape != (inputs.shape[0],):
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(f"{what} need {name} of shape [{inputs.shape[0]}], got {shape}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, model.num_classes={num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
