"""Causal grouped-query attention behind one function, and the choice of its kernel.

For causal attention without an explicit mask (training, prefill without padding) on CUDA
the kernel is chosen by measurement (`select_attention_kernel`, once per run, at the run's
shapes): flash-attn's `flash_attn_func` when it imports, and each of PyTorch SDPA's cuDNN,
flash, memory-efficient and math kernels, forward + backward, the fastest wins (at head dim
64 on Hopper cuDNN SDPA beat flash-attn 2 by 1.6x). A winning SDPA kernel is put first in
SDPA's priority order, the others stay behind it for shapes it refuses (masks), and the run
log names the kernel that runs. Without a selection (generation, scripts) flash-attn runs
when it imports and PyTorch picks the SDPA kernel. SDPA is called with `enable_gqa`, so the
4 KV heads are shared by the 32 query heads without materialising repeated K/V.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from model import flash_attn
from model.document_mask import document_attention


# Looked up here at call time (tests replace them on this module).
flash_attn_usable = flash_attn.flash_attn_usable
flash_attn_func = flash_attn.flash_attn_func
_HAS_FLASH_ATTN = flash_attn.HAS_FLASH_ATTN
FLASH_ATTN_STATUS = flash_attn.FLASH_ATTN_STATUS


# ---- the kernel, chosen by measurement --------------------------------------------------------
# Candidates in the order that breaks ties: flash-attn, then SDPA's kernels.
KERNELS = ("flash-attn", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")
_selected: str | None = None  # set by select_attention_kernel


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}


def choose_attention_kernel(timings: dict[str, float | None]) -> str:
    """The fastest kernel of `timings` (ms; None or non-finite: it did not run), ties in KERNELS' order."""
    ran = [(ms, KERNELS.index(k), k) for k, ms in timings.items() if ms is not None and math.isfinite(ms)]
    if not ran:
        raise RuntimeError(f"no attention kernel ran at the run's shapes (measured: {timings})")
    return min(ran)[2]


def measure_attention_kernels(device, dtype: torch.dtype, batch: int, seq: int, n_head: int, n_kv_head: int,
                              head_dim: int, reps: int = 5, clock: Callable[[], float] = time.perf_counter
                              ) -> dict[str, float | None]:
    """ms per causal GQA forward + backward of each kernel at these shapes (None: refused or failed)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seq, n_head, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(batch, seq, n_kv_head, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(batch, seq, n_kv_head, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    timings: dict[str, float | None] = {}
    for kernel in KERNELS:
        if kernel == "flash-attn" and not flash_attn_usable(q):
            timings[kernel] = None
            continue

        def run(kernel=kernel):
            out = flash_attn_func(q, k, v, causal=True) if kernel == "flash-attn" else _forced_sdpa(q, k, v, kernel)
            out.sum().backward()
        try:
            run()  # warm-up (and the refusal of a kernel that cannot take these inputs)
            _sync(device)
            start = clock()
            for _ in range(reps):
                run()
            _sync(device)
            timings[kernel] = (clock() - start) / reps * 1e3
        except RuntimeError:  # "No available kernel" and friends: this kernel does not run here
            timings[kernel] = None
    return timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forced_sdpa(q, k, v, kernel: str):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backends()[kernel]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                              enable_gqa=q.shape[2] != k.shape[2])


def use_attention_kernel(kernel: str | None) -> None:
    """Make `kernel` the one causal attention runs (None: back to no selection). An SDPA kernel
    goes first in SDPA's priority order, with the others behind it for inputs it refuses."""
    global _selected
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    from torch.nn.attention import _sdpa_kernel

    backends = _sdpa_backends()
    first = [backends[kernel]] if kernel in backends else []
    _sdpa_kernel(first + [b for name, b in backends.items() if name != kernel], set_priority=True)
    _selected = kernel


def select_attention_kernel(device, dtype: torch.dtype, batch: int, seq: int, n_head: int, n_kv_head: int,
                            head_dim: int, measure=measure_attention_kernels,
                            agree: Callable[[dict], dict] = lambda t: t) -> tuple[str, dict]:
    """On CUDA in fp16/bf16: measure every kernel at the run's shapes and use the fastest;
    returns (kernel, timings). `agree` combines the timings of all ranks (a sum), so every
    rank picks the same kernel. Elsewhere nothing is measured: SDPA's CPU kernels run."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return attention_backend(device, dtype), {}
    timings = agree(measure(device, dtype, batch, seq, n_head, n_kv_head, head_dim))
    kernel = choose_attention_kernel(timings)
    use_attention_kernel(kernel)
    return kernel, timings


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The attention kernel training runs on `device` in `dtype`, in words (for the run log)."""
    device = torch.device(device)
    if device.type == "cuda" and _selected is not None:
        return _selected + " (measured)"
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
        return document_attention(q, k, v, documents)
    if backend not in ("auto", "flash", "sdpa"):
        raise ValueError(f"attention backend must be 'auto', 'flash' or 'sdpa', got {backend!r}")
    if window is not None and window >= k.shape[1]:
        window = None  # every key is within the window: plain causal attention
    use_flash = flash_attn_usable(q) and (backend == "flash" or _selected in (None, "flash-attn"))
    if mask is None and backend != "sdpa" and use_flash:
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
