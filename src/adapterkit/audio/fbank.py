"""Kaldi-style log-mel filterbank in plain torch (torchaudio is not needed).

Matches ``torchaudio.compliance.kaldi.fbank`` with the options the Audio Spectrogram
Transformer uses (``htk_compat=True, use_energy=False, window_type="hanning",
num_mel_bins=128, dither=0, frame_shift=10``), i.e. for each 25 ms frame (snip_edges:
only whole frames, hop 10 ms): remove the DC offset, pre-emphasis 0.97 (first sample
against itself), symmetric Hann window, zero-pad to the next power of two, power
spectrum, triangular filters equally spaced on the Kaldi mel scale
1127 ln(1 + f / 700) between 20 Hz and Nyquist, natural log floored at float32 eps.

:func:`ast_features` then pads/truncates to ``max_length`` frames and normalises with
AST's AudioSet statistics: (fbank - (-4.2677393)) / (4.5689974 * 2).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from adapterkit.errors import DataError

AST_MEAN = -4.2677393
AST_STD = 4.5689974
EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, Kaldi's log floor


def mel_scale(f):
    return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)


@lru_cache(maxsize=16)
def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """(num_bins, padded_window // 2 + 1) triangular weights (Nyquist column zero), float64."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise DataError(f"bad mel frequency range [{low_freq}, {high_freq}] for sample rate {sample_rate}")
    n_fft_bins = padded_window // 2
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left = mel_low + b * delta
    center = left + delta
    right = center + delta
    mel = mel_scale(sample_rate / padded_window * torch.arange(n_fft_bins, dtype=torch.float64)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.cat([w, torch.zeros(num_bins, 1, dtype=torch.float64)], dim=1)


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float = 0.0, remove_dc_offset: bool = True) -> torch.Tensor:
    """Log-mel filterbank of a mono waveform (T,) or a batch (B, T): (frames, bins) or (B, frames, bins)."""
    x = torch.as_tensor(waveform)
    single = x.dim() == 1
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise DataError(f"kaldi_fbank expects a waveform (T,) or (B, T), got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    win = int(sample_rate * frame_length_ms * 0.001)
    hop = int(sample_rate * frame_shift_ms * 0.001)
    if x.shape[1] < win:
        raise DataError(f"waveform of {x.shape[1]} samples is shorter than one {frame_length_ms} ms frame ({win})")
    frames = x.unfold(1, win, hop)                                    # (B, F, win)
    if remove_dc_offset:
        frames = frames - frames.mean(-1, keepdim=True)
    if preemphasis:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * prev
    window = torch.hann_window(win, periodic=False, dtype=torch.float64)
    frames = frames * window
    padded = 1 << (win - 1).bit_length()
    spec = torch.fft.rfft(frames, n=padded).abs().pow(2.0)            # (B, F, padded/2+1)
    banks = kaldi_mel_banks(num_mel_bins, padded, float(sample_rate), low_freq, high_freq)
    mel = torch.matmul(spec, banks.T)
    out = torch.log(torch.clamp(mel, min=EPS)).to(torch.float32)
    return out[0] if single else out


def pad_or_trim(fb: torch.Tensor, max_length: int) -> torch.Tensor:
    """Zero-pad or cut the frame axis (-2) to ``max_length`` frames (as AST's feature extractor)."""
    n = fb.shape[-2]
    if n >= max_length:
        return fb[..., :max_length, :]
    pad = fb.new_zeros(*fb.shape[:-2], max_length - n, fb.shape[-1])
    return torch.cat([fb, pad], dim=-2)


def ast_features(waveform: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128, max_length: int = 1024,
                 mean: float = AST_MEAN, std: float = AST_STD, subtract_mean: bool = True) -> torch.Tensor:
    """AST ``input_values``: fbank padded/trimmed to ``max_length`` frames, normalised."""
    x = torch.as_tensor(waveform, dtype=torch.float32)
    if subtract_mean:
        x = x - x.mean(-1, keepdim=True)
    fb = pad_or_trim(kaldi_fbank(x, sample_rate, num_mel_bins), max_length)
    return (fb - mean) / (std * 2.0)


def num_frames(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0) -> int:
    win = int(sample_rate * frame_length_ms * 0.001)
    hop = int(sample_rate * frame_shift_ms * 0.001)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


__all__ = ["AST_MEAN", "AST_STD", "ast_features", "kaldi_fbank", "kaldi_mel_banks", "mel_scale", "num_frames",
           "pad_or_trim"]
