"""Causal grouped-query attention behind one function.

flash-attn's `flash_attn_func` runs when it is installed, the tensors are on CUDA in
fp16/bf16 and no explicit mask is needed (training, prefill without padding); otherwise
PyTorch's scaled_dot_product_attention runs, with `enable_gqa` so the 4 KV heads are
shared by the 32 query heads without materialising repeated K/V.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
if _HAS_FLASH_ATTN:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
else:
    flash_attn_func = flash_attn_varlen_func = None


def flash_attn_usable(q: torch.Tensor) -> bool:
    return _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash_attn_varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn's packed-sequence kernel (attention within documents) can run here."""
    return _HAS_FLASH_ATTN and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "auto", documents=None) -> torch.Tensor:
    """q: (B, T, Hq, D); k, v: (B, S, Hk, D) with Hq % Hk == 0. Returns (B, T, Hq, D).

    Without `mask` the attention is causal with queries aligned to the last T keys
    (T == S in training). `mask` (bool, broadcastable to (B, 1, T, S), True = attend)
    replaces the causal rule entirely, for KV-cache decoding with padding.
    `backend` is "auto", "flash" or "sdpa" (tests force "sdpa"). `documents` (a
    model.document_mask.Documents) restricts each token to its own document instead.
    """
    if documents is not None:
        from model.document_mask import document_attention

        return document_attention(q, k, v, documents)
    if backend not in ("auto", "flash", "sdpa"):
        raise ValueError(f"attention backend must be 'auto', 'flash' or 'sdpa', got {backend!r}")
    if mask is None and backend != "sdpa" and flash_attn_usable(q):
        return flash_attn_func(q, k, v, causal=True)
    if backend == "flash":
        raise RuntimeError("attention backend 'flash' needs flash-attn installed, CUDA fp16/bf16 tensors and no mask")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if mask is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("causal attention without a mask needs as many queries as keys; pass a mask")
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
