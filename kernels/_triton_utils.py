"""Shared plumbing for the Triton kernels: an import guard and launch-argument checks.

`kernels` must import on machines without Triton (macOS laptops), so the kernel files
take `triton` and `tl` from here. Without Triton they get stand-ins whose `jit` keeps the
module importable; calling any Triton function then fails early in `check_launch` with a
message that says what to do instead.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Missing:
        """Enough of `triton`/`triton.language` for the decorators and annotations to load."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Missing()


# Triton picks compiled vs interpreted kernels when `@triton.jit` runs, i.e. at import time,
# so a TRITON_INTERPRET set later does not help: remember how the kernels were built.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED_AT_IMPORT


def check_launch(name: str, *tensors: torch.Tensor) -> None:
    """Fail early, with the fix, when a Triton kernel cannot run on these tensors."""
    if not HAS_TRITON:
        raise RuntimeError(f"kernels.{name}: triton is not installed; install it (Linux x86-64) "
                           f"or use the PyTorch reference (kernels='torch' / kernels.{name}_reference)")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"kernels.{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not _INTERPRETED_AT_IMPORT:
        raise RuntimeError(f"kernels.{name}: tensors are on {device}, Triton needs CUDA; set "
                           f"TRITON_INTERPRET=1 before importing kernels to run on CPU, or use kernels='torch'")


def check_float(name: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kernels.{name}: {arg} must be float32, float16 or bfloat16, got {t.dtype}")


# Host-side launch arithmetic in plain Python: since Triton 3.5 `triton.cdiv` and
# `triton.next_power_of_2` are constexpr functions whose host call costs microseconds each,
# and the small kernels' forward+backward is short enough for host time to show.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Warps for a program that handles `block` elements: ~256 elements per warp, 1..16."""
    return max(1, min(16, block // 256))


def num_programs(work_items: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs for a persistent loop over work items: `per_sm` per SM on CUDA (as many as can be
    resident at once, so there is a single wave), few on the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(work_items, per_sm * sms))
    return max(1, min(work_items, 4))
