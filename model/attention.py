"""Causal grouped-query attention behind one function.

flash-attn's `flash_attn_func` runs when it is installed, the tensors are on CUDA in
fp16/bf16 and no explicit mask is needed (training, prefill without padding); otherwise
PyTorch's scaled_dot_product_attention runs, with `enable_gqa` so the 4 KV heads are
shared by the 32 query heads without materialising repeated K/V.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F


def _import_flash_attn():
    """(flash_attn_func, flash_attn_varlen_func, status): the functions are None, and the status
    says why, when flash-attn is absent or does not load.

    A wheel built for another torch or CUDA fails with an ImportError ("undefined symbol")
    or an OSError from its shared library; that must not stop `import model`, so SDPA runs
    instead and one warning says so.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return None, None, "flash-attn is not installed"
    try:
        from flash_attn import flash_attn_func as fn
        from flash_attn import flash_attn_varlen_func as varlen_fn
    except Exception as e:  # noqa: BLE001 - any failure of a compiled extension means "not usable"
        reason = f"flash-attn is installed but failed to import ({type(e).__name__}: {e})"
        warnings.warn(f"{reason}; attention uses PyTorch SDPA instead. Reinstall flash-attn for this "
                      f"torch {torch.__version__} (pip install flash-attn --no-build-isolation) to use it.",
                      RuntimeWarning, stacklevel=2)
        return None, None, reason
    return fn, varlen_fn, "flash-attn"


flash_attn_func, flash_attn_varlen_func, FLASH_ATTN_STATUS = _import_flash_attn()
_HAS_FLASH_ATTN = flash_attn_func is not None


def flash_attn_usable(q: torch.Tensor) -> bool:
    return _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash_attn_varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn's packed-sequence kernel (attention within documents) can run here."""
    return _HAS_FLASH_ATTN and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The attention implementation training uses on `device` in `dtype`, in words (for the run log)."""
    device = torch.device(device)
    if _HAS_FLASH_ATTN and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash-attn"
    why = "" if _HAS_FLASH_ATTN or device.type != "cuda" else f" ({FLASH_ATTN_STATUS})"
    return f"sdpa{why}"


def sliding_window_mask(window: int, T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool, True = attend: the causal rule with queries aligned to the last T of S keys,
    limited to the `window` most recent keys of each query (itself included), as HF's
    Mistral masks it (key j is seen by query i when i - window < j <= i)."""
    query = torch.arange(S - T, S, device=device)[:, None]
    key = torch.arange(S, device=device)[None, :]
    return (key <= query) & (key > query - window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "auto", documents=None, window: int | None = None) -> torch.Tensor:
    """q: (B, T, Hq, D); k, v: (B, S, Hk, D) with Hq % Hk == 0. Returns (B, T, Hq, D).

    Without `mask` the attention is causal with queries aligned to the last T keys
    (T == S in training). `mask` (bool, broadcastable to (B, 1, T, S), True = attend)
    replaces the causal rule entirely, for KV-cache decoding with padding.
    `backend` is "auto", "flash" or "sdpa" (tests force "sdpa"). `documents` (a
    model.document_mask.Documents) restricts each token to its own document instead.
    `window` (Mistral's sliding window) limits the causal rule to the `window` most recent
    keys, the query's own included; an explicit `mask` or `documents` carry their own window.
    """
    if documents is not None:
        from model.document_mask import document_attention

        return document_attention(q, k, v, documents)
    if backend not in ("auto", "flash", "sdpa"):
        raise ValueError(f"attention backend must be 'auto', 'flash' or 'sdpa', got {backend!r}")
    if window is not None and window >= k.shape[1]:
        window = None  # every key is within the window: plain causal attention
    if mask is None and backend != "sdpa" and flash_attn_usable(q):
        if window is not None:  # flash-attn's window is inclusive: (window - 1) keys back, 0 ahead
            return flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))
        return flash_attn_func(q, k, v, causal=True)
    if backend == "flash":
        raise RuntimeError("attention backend 'flash' needs flash-attn installed, CUDA fp16/bf16 tensors and no mask")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if mask is None and window is not None:
        mask = sliding_window_mask(window, q.shape[1], k.shape[1], q.device)
    if mask is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("causal attention without a mask needs as many queries as keys; pass a mask")
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
