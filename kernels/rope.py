"""Rotary position embedding in the HF rotate_half layout, for q and k of (B, T, H, D)."""
import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: (B, T, Hq, D), k: (B, T, Hk, D); cos/sin: (T, D) or (B, T, D), fp32. Returns (q, k)."""
    cos = cos.unsqueeze(-2).float()  # broadcast over heads
    sin = sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rope(q, k, cos, sin):
    raise NotImplementedError("Triton RoPE: being written (kernels issue)")
