"""Modality encoders: turn raw inputs into sequences of ``hidden``-sized token vectors for the shared trunk.

* :class:`TextEncoder`: byte tokens ``[B, T]`` -> ``wte[tokens] + wpe[0..T)``.
* :class:`ImageEncoder`: images ``[B, C, H, W]`` -> ``[CLS; patches] + positions`` (ViT patch embedding).
* :class:`AudioEncoder`: waveforms ``[B, S]`` -> ``Linear(log-mel frames) + positions``.

All three return ``[B, tokens, hidden]`` and reject inputs whose shape disagrees with the run's
:class:`~swarmtrain.dht.records.ModelSpec` with a ValueError that says what was expected. Not for: the
transformer trunk or any head (see :mod:`swarmtrain.peer.model`).
"""
from __future__ import annotations

import torch
from torch import nn

from swarmtrain.dht.records import ModelSpec
from swarmtrain.peer.audio import LogMelSpectrogram



class TextEncoder(nn.Module):
    """Byte-token embedding plus learned absolute positions (shared by text and image captions)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.vocab = spec.text_vocab
        self.max_len = max(spec.text_seq_len, spec.caption_len)
        self.wte = nn.Embedding(spec.text_vocab, spec.hidden)
        self.wpe = nn.Embedding(self.max_len, spec.hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len or tokens.dtype != torch.long:
            raise ValueError(
                f"text tokens must be a long tensor [batch, length <= {self.max_len}], "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(f"text tokens must lie in [0, {self.vocab}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)


class ImageEncoder(nn.Module):
    """ViT-style: non-overlapping ``patch x patch`` patches -> Linear (as a strided Conv2d), a CLS token in front."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.channels, self.size, self.patch = spec.image_channels, spec.image_size, spec.patch_size
        self.num_patches = (spec.image_size // spec.patch_size) ** 2
        self.patch_embed = nn.Conv2d(spec.image_channels, spec.hidden, spec.patch_size, stride=spec.patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, spec.hidden))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.num_patches, spec.hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.size, self.size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [batch, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        patches = self.patch_embed(images.float()).flatten(2).transpose(1, 2)  # [B, num_patches, hidden]
        cls = self.cls.expand(images.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos


class AudioEncoder(nn.Module):
    """Log-mel frames (at most ``audio_max_frames``) -> Linear to ``hidden`` plus learned positions."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.max_frames = spec.audio_max_frames
        self.log_mel = LogMelSpectrogram(spec.audio_sample_rate, spec.audio_n_fft, spec.audio_hop, spec.audio_n_mels)
        self.frame_proj = nn.Linear(spec.audio_n_mels, spec.hidden)
        self.pos = nn.Parameter(torch.randn(1, spec.audio_max_frames, spec.hidden))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        frames = self.log_mel(waveform)[:, : self.max_frames]  # [B, frames, n_mels]
        return self.frame_proj(frames) + self.pos[:, : frames.shape[1]]
