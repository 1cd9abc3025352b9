"""Fused kernels and their plain-PyTorch references, behind one switch.

Each kernel lives in its own file beside its reference (same maths, fp32 inside).
The model never imports a kernel directly: it asks `get_ops(backend)` for a bundle of
functions, so "triton" and "torch" are interchangeable everywhere else.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from kernels._triton_utils import HAS_TRITON, interpreted
from kernels.cross_entropy import cross_entropy, cross_entropy_reference
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.rope import apply_rope, apply_rope_reference
from kernels.swiglu import swiglu, swiglu_reference

BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "BACKENDS", "get_ops", "resolve_backend", "triton_available",
    "rms_norm", "apply_rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy",
    "rms_norm_reference", "apply_rope_reference", "swiglu_reference",
    "cross_entropy_reference", "fused_linear_cross_entropy_reference",
]


def triton_available() -> bool:
    """True when triton imported cleanly (kernels/_triton_utils.py tried it once)."""
    return HAS_TRITON


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' means Triton on CUDA and PyTorch elsewhere.

    On CUDA the PyTorch references need about twice the activation memory of the fused
    kernels, so 'auto' never falls back to them quietly: without a working Triton it is an
    error, and the references run on a GPU only when asked for with kernels='torch'.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if not triton_available():
            raise RuntimeError("kernels='auto' on CUDA needs Triton, which did not import; install it "
                               "(pip install triton) or pass --kernels torch to run the PyTorch references "
                               "(about twice the activation memory)")
        return "triton"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernels='triton' but triton is not installed; "
                               "install it (Linux x86-64) or use kernels='torch'")
        if device.type != "cuda" and not interpreted():
            raise RuntimeError(f"kernels='triton' needs a CUDA device (got {device}); set TRITON_INTERPRET=1 "
                               "before importing kernels to run them on CPU, or use kernels='torch'")
    return backend


_TRITON = SimpleNamespace(rms_norm=rms_norm, apply_rope=apply_rope, swiglu=swiglu,
                          cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy)
_TORCH = SimpleNamespace(rms_norm=rms_norm_reference, apply_rope=apply_rope_reference,
                         swiglu=swiglu_reference, cross_entropy=cross_entropy_reference,
                         fused_linear_cross_entropy=fused_linear_cross_entropy_reference)


def get_ops(backend: str) -> SimpleNamespace:
    """The kernel bundle for a resolved backend ('triton' or 'torch')."""
    if backend == "triton":
        return _TRITON
    if backend == "torch":
        return _TORCH
    raise ValueError(f"get_ops needs a resolved backend ('triton' or 'torch'), got {backend!r}")
