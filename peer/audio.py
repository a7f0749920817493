"""Audio signal processing in plain torch: log-mel spectrograms, resampling and reading PCM WAV files.

The model turns waveforms into log-mel frames with :class:`LogMelSpectrogram` (a short-time Fourier transform with a
Hann window, then a triangular mel filterbank on the HTK mel scale ``mel = 2595 log10(1 + f / 700)``);
:mod:`swarmtrain.peer.data` reads user WAV files with :func:`read_wav` and brings them to the run's sample rate with
:func:`resample`. Not for: augmentation, feature caching, or any format other than uncompressed 8/16-bit PCM WAV.
"""
from __future__ import annotations

import math
import wave
from pathlib import Path

import torch
from torch import nn


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular mel filters ``[n_fft // 2 + 1, n_mels]`` spanning 0 Hz .. Nyquist, HTK scale, peak height 1.

    Filter ``i`` rises linearly from mel point ``i`` to ``i + 1`` and falls to ``i + 2``, where the ``n_mels + 2``
    points are evenly spaced in mel. Raises ValueError when the FFT is too coarse to give every filter a bin.
    """
    n_freqs = n_fft // 2 + 1
    fft_hz = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges_hz = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(sample_rate / 2)), n_mels + 2, dtype=torch.float64))
    lower, center, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    f = fft_hz[:, None]
    rising = (f - lower) / (center - lower)
    falling = (upper - f) / (upper - center)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    empty = (filters.sum(0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"audio_n_mels={n_mels} is too many for audio_n_fft={n_fft} at {sample_rate} Hz: "
            f"mel filters {empty} cover no FFT bin; use fewer mels or a larger n_fft"
        )
    return filters.float()


def mel_centers_hz(sample_rate: int, n_mels: int) -> torch.Tensor:
    """Center frequency (Hz) of each filter of :func:`mel_filterbank`."""
    points = torch.linspace(0.0, float(hz_to_mel(sample_rate / 2)), n_mels + 2, dtype=torch.float64)
    return mel_to_hz(points[1:-1]).float()


class LogMelSpectrogram(nn.Module):
    """Waveforms ``[B, S]`` -> log-mel frames ``[B, frames, n_mels]`` with ``frames = 1 + S // hop``.

    ``power = |STFT(x, hann(n_fft), hop)|^2``, ``mel = power @ filterbank``, then Whisper-style scaling:
    ``log10(max(mel, 1e-10))`` floored at 8 decades below each clip's peak, mapped by ``(v + 4) / 4`` to about
    [-1, 1]. The window and filterbank are non-persistent buffers: they are rebuilt from the sizes, never trained
    or averaged.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int):
        super().__init__()
        self.sample_rate, self.n_fft, self.hop, self.n_mels = sample_rate, n_fft, hop, n_mels
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2 or waveform.shape[1] < self.n_fft:
            raise ValueError(
                f"audio must be [batch, samples] with at least audio_n_fft={self.n_fft} samples, "
                f"got shape {tuple(waveform.shape)}"
            )
        spectrum = torch.stft(
            waveform.float(), self.n_fft, hop_length=self.hop, window=self.window, center=True, return_complex=True
        )  # [B, n_fft // 2 + 1, frames]
        power = spectrum.abs() ** 2
        mel = power.transpose(1, 2) @ self.filterbank  # [B, frames, n_mels]
        log_mel = torch.log10(mel.clamp_min(1e-10))
        peak = log_mel.amax(dim=(1, 2), keepdim=True)
        log_mel = torch.maximum(log_mel, peak - 8.0)
        return (log_mel + 4.0) / 4.0


def num_samples_for_frames(frames: int, hop: int) -> int:
    """Waveform length that :class:`LogMelSpectrogram` turns into exactly ``frames`` frames."""
    return (frames - 1) * hop


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform by truncating or zero-padding its spectrum (FFT method)."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return waveform.float()
    n_in = waveform.shape[-1]
    n_out = max(1, round(n_in * new_rate / orig_rate))
    spectrum = torch.fft.rfft(waveform.double())
    keep = min(spectrum.shape[-1], n_out // 2 + 1)
    resized = spectrum.new_zeros(n_out // 2 + 1)
    resized[:keep] = spectrum[:keep]
    return (torch.fft.irfft(resized, n=n_out) * (n_out / n_in)).float()


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read an uncompressed 8- or 16-bit PCM WAV file: (mono waveform in [-1, 1] ``[S]`` float32, sample rate).

    Channels are averaged. Raises ValueError naming the file when it is not a readable PCM WAV of those widths.
    """
    try:
        with wave.open(str(path), "rb") as reader:
            channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
            frames = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(f"cannot read WAV file {path}: {e}") from None
    if len(frames) == 0 or len(frames) % (width * channels):
        raise ValueError(f"WAV file {path} holds no complete audio frames")
    if width == 1:
        samples = (torch.frombuffer(bytearray(frames), dtype=torch.uint8).float() - 128.0) / 128.0
    elif width == 2:
        samples = torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768.0
    else:
        raise ValueError(f"unsupported WAV sample width in {path}: {8 * width}-bit (use 8- or 16-bit PCM)")
    return samples.view(-1, channels).mean(dim=1), rate


def fit_length(waveform: torch.Tensor, length: int) -> torch.Tensor:
    """Crop a 1-D waveform to its first ``length`` samples, or zero-pad it at the end to ``length``."""
    if waveform.shape[-1] >= length:
        return waveform[..., :length]
    return nn.functional.pad(waveform, (0, length - waveform.shape[-1]))


def sine(frequency_hz: float, sample_rate: int, num_samples: int, amplitude: float = 0.5) -> torch.Tensor:
    """A pure tone ``amplitude * sin(2 pi f t)`` of ``num_samples`` samples (tests and synthetic examples)."""
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    return (amplitude * torch.sin(2 * math.pi * frequency_hz * t)).float()
