"""flash-attn, when it is installed and loads: its two kernels and a sentence saying why not.

Both attention paths use it (model/attention.py for causal attention, model/document_mask.py
for packed documents), so the import is tried once, here, and neither of them imports the other.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch


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
HAS_FLASH_ATTN = flash_attn_func is not None


def flash_attn_usable(q: torch.Tensor) -> bool:
    return HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash_attn_varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn's packed-sequence kernel (attention within documents) can run here."""
    return HAS_FLASH_ATTN and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
