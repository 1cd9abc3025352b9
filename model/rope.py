"""The RoPE tables: cos and sin per position, for every `rope_type` a Config can hold.

One function computes them (`rope_cache`); the model keeps one table per device. The
frequencies are HF's, so imported weights see the rotations they were trained with:

    default  inv_freq_i = base^(-2i/d)
    linear   inv_freq / factor (positions interpolated: CodeLlama-style context extension)
    llama3   Llama-3.1's rescaling by wavelength: bands longer than original_context/low_freq_factor
             are divided by factor, bands shorter than original_context/high_freq_factor are kept,
             and the ones between are interpolated smoothly

None of these types scales the attention logits, so cos/sin are used as they are.
"""
from __future__ import annotations

import math

import torch

from model.config import Config


def inverse_frequencies(config: Config, device=None) -> torch.Tensor:
    """(head_dim / 2,) fp32 rotation frequencies of `config`'s RoPE."""
    d = config.head_dim
    # int64 arange then fp32, as transformers computes it: the same rounding, the same logits
    exponents = torch.arange(0, d, 2, device=device, dtype=torch.int64).to(torch.float32) / d
    inv_freq = 1.0 / (config.rope_base ** exponents)
    if config.rope_type == "default":
        return inv_freq
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        factor, context = config.rope_factor, config.rope_original_context
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {config.rope_type!r} has no frequency table")


def rope_cache(config: Config, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim) in fp32, HF rotate_half layout."""
    inv_freq = inverse_frequencies(config, device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()
