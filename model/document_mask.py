"""Attention within documents: where each document of a batch of windows starts, in the form
the chosen attention kernel takes.

A pretraining window is a slice of the token stream, so it usually holds the end of one
document, some whole ones and the start of another, separated by EOS. With a document mask
a token attends only to earlier tokens of its own document, and its RoPE position counts
from that document's first token, so every document is computed exactly as if it were
alone in the window. A document starts at position 0 of the window and right after each
EOS; the EOS belongs to the document it ends.

Three kernels, chosen once (`document_attention_backend`) and printed by the trainer:

    flex          PyTorch's flex_attention with a block mask built from the document ids, once
                  per micro-batch (shared by every layer) by a compiled builder on CUDA; blocks
                  that no document spans are skipped. The default on CUDA: nothing in it waits
                  for the device.
    flash-varlen  flash-attn's varlen kernel over the batch's documents as packed sequences
                  (cu_seqlens from the EOS positions; no mask is ever materialised). Only when
                  asked for (--document-attention flash-varlen): the number of documents sizes
                  cu_seqlens, so each micro-batch waits once for the device (`nonzero`).
    sdpa-mask     scaled_dot_product_attention with a dense (B, 1, T, T) block-diagonal causal
                  mask: the reference, and what a CPU runs

With a sliding window (Mistral) each kernel also limits a token to the `window` most recent
tokens of its document, itself included: flash-attn's `window_size`, a term of flex's
mask_mod, a band of the dense mask.
"""
from __future__ import annotations

import functools

import torch

from model import flash_attn

DOCUMENT_BACKENDS = ("flash-varlen", "flex", "sdpa-mask")


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_attention_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The kernel for attention within documents: flex_attention on CUDA, else the dense-mask
    SDPA (CPU). `requested` forces one (flash-varlen: flash-attn's, with one host wait per
    micro-batch)."""
    device = torch.device(device)
    if requested != "auto":
        if requested not in DOCUMENT_BACKENDS:
            raise ValueError(f"document attention backend must be auto or one of {', '.join(DOCUMENT_BACKENDS)}, "
                             f"got {requested!r}")
        if requested == "flash-varlen" and not flash_attn.flash_attn_varlen_usable(device, dtype):
            raise ValueError("document attention 'flash-varlen' needs flash-attn installed and CUDA fp16/bf16")
        if requested == "flex" and not _flex_available():
            raise ValueError("document attention 'flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5)")
        return requested
    if device.type == "cuda" and _flex_available():
        return "flex"
    return "sdpa-mask"


class Documents:
    """The documents of a (B, T) batch of token windows, for one forward pass (built once by
    Llama.forward, used by every layer).

    `positions` (B, T) restart at 0 at every document; `backend` decides which of
    `cu_seqlens` (flash-varlen), `block_mask` (flex) or `dense_mask` (sdpa-mask) is built.
    `window` (None: no limit) is the sliding window, in tokens, the query's own included.
    """

    def __init__(self, input_ids: torch.Tensor, eos_id: int, backend: str, window: int | None = None):
        if backend not in DOCUMENT_BACKENDS:
            raise ValueError(f"unknown document attention backend {backend!r}; one of {', '.join(DOCUMENT_BACKENDS)}")
        B, T = input_ids.shape
        self.backend, self.batch, self.seq_len = backend, B, T
        self.window = window if window is not None and window < T else None  # a window >= T limits nothing
        window = self.window
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = input_ids[:, :-1] == eos_id
        index = torch.arange(T, device=input_ids.device).expand(B, T)
        # Position within the document: distance to the latest start at or before the token.
        self.positions = index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
        self.doc_ids = starts.long().cumsum(dim=-1)  # (B, T), 1 for the window's first document
        self.cu_seqlens = self.block_mask = self.dense_mask = None
        if backend == "flash-varlen":
            # Documents of every row packed one after the other: row b's tokens are [b·T, (b+1)·T).
            flat = torch.nonzero(starts.reshape(-1), as_tuple=True)[0]
            end = torch.tensor([B * T], device=flat.device, dtype=flat.dtype)
            self.cu_seqlens = torch.cat([flat, end]).to(torch.int32)
        elif backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids

            if window is None:
                def same_document_causal(b, h, q_idx, kv_idx):
                    return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])
            else:
                def same_document_causal(b, h, q_idx, kv_idx):
                    return (kv_idx <= q_idx) & (q_idx - kv_idx < window) & (doc[b, q_idx] == doc[b, kv_idx])
            # Compiled on CUDA: the eager builder evaluates the mask on every (q, kv) pair. The
            # document ids are a tensor the mask closes over: a new batch needs no recompilation.
            self.block_mask = create_block_mask(same_document_causal, B, None, T, T, device=input_ids.device,
                                                _compile=input_ids.is_cuda)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            if window is not None:
                causal = causal & ~torch.ones_like(causal).tril(-window)  # drop keys window or more back
            same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
            self.dense_mask = (same & causal)[:, None]  # (B, 1, T, T), True = attend


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    # flex_attention is a template that torch.compile turns into a fused kernel; eager it
    # materialises the scores, which is what the CPU (tests) gets.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents) -> torch.Tensor:
    """q: (B, T, Hq, D); k, v: (B, T, Hk, D). Causal attention within each document; (B, T, Hq, D)."""
    B, T, Hq, D = q.shape
    if documents.backend == "flash-varlen":
        window = (-1, -1) if documents.window is None else (documents.window - 1, 0)
        out = flash_attn.flash_attn_varlen_func(q.reshape(B * T, Hq, D), k.reshape(B * T, -1, D),
                                                v.reshape(B * T, -1, D), documents.cu_seqlens,
                                                documents.cu_seqlens, T, T, causal=True, window_size=window)
        return out.view(B, T, Hq, D)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = Hq != k.shape[2]
    if documents.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex_attention() if q.is_cuda else flex_attention
        out = fn(qt, kt, vt, block_mask=documents.block_mask, enable_gqa=gqa)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=documents.dense_mask,
                                                               enable_gqa=gqa)
    return out.transpose(1, 2)
