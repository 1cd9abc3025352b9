"""Rotary position embedding in the HF rotate_half layout, for q and k of (B, T, H, D).

`apply_rope_reference` is the plain-PyTorch definition; `apply_rope` is the fused Triton
version: one program rotates all query and key heads (GQA: different head counts) of a
few tokens (two at TinyLlama's 32 x 64 heads), reading each token's cos/sin once. q and k
may be strided views of one fused qkv projection; they are read in place through their
strides.

Outputs are new tensors rather than in-place writes into q/k: q and k are outputs of
`split` (multi-output views), which autograd forbids modifying in place, and the qkv buffer
stays alive for v anyway. Backward needs nothing saved but cos/sin: the rotation's
gradient is the inverse rotation of the incoming gradient. cos/sin get no gradient.
"""
import torch

from kernels._triton_utils import cdiv, check_float, check_launch, next_pow2, num_warps_for, tl, triton


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


@triton.jit
def _load_heads(x_ptr, x_tok, x_stride_h, n_heads, half, cols, tok_mask, col_mask, BLOCK_H: tl.constexpr):
    """Both halves of a (tokens, heads, 2*half) tile, in fp32; x_tok are the tokens' offsets."""
    heads = tl.arange(0, BLOCK_H)
    mask = tok_mask[:, None, None] & (heads[None, :, None] < n_heads) & col_mask[None, None, :]
    x_off = x_tok[:, None, None] + heads[None, :, None] * x_stride_h + cols[None, None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _rotate_store(x1, x2, y_ptr, y_tok, y_stride_h, n_heads, c1, c2, s1, s2, half, cols, tok_mask, col_mask,
                  BLOCK_H: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate a loaded tile by c*/s* (tokens, half) and store it at y_tok (the tokens' offsets)."""
    heads = tl.arange(0, BLOCK_H)
    mask = tok_mask[:, None, None] & (heads[None, :, None] < n_heads) & col_mask[None, None, :]
    y_off = y_tok[:, None, None] + heads[None, :, None] * y_stride_h + cols[None, None, :]
    c1, c2, s1, s2 = c1[:, None, :], c2[:, None, :], s1[:, None, :], s2[:, None, :]
    if INVERSE:
        # Transpose of the forward rotation: the gradient w.r.t. the input.
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + y_off, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_off + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, n_tokens, seq_len,
                 q_sb, q_st, q_sh, k_sb, k_st, k_sh, qo_sb, qo_st, qo_sh, ko_sb, ko_st, ko_sh,
                 cs_sb, cs_st, n_q_heads, n_k_heads, half,
                 BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    # A program rotates BLOCK_T consecutive tokens (flattened b * T + t), all heads of q and k.
    # Every load (cos/sin, q, k) is issued before the first store: the compiler may not move a
    # load past a store to a possibly aliasing pointer, so loading k after storing q would
    # cost each program a second memory round trip.
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    b = tok // seq_len
    t = tok % seq_len
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    q1, q2 = _load_heads(q_ptr, b * q_sb + t * q_st, q_sh, n_q_heads, half, cols, tok_mask, col_mask, BLOCK_HQ)
    k1, k2 = _load_heads(k_ptr, b * k_sb + t * k_st, k_sh, n_k_heads, half, cols, tok_mask, col_mask, BLOCK_HK)
    # Each token's cos/sin row is read once and applied to all of its heads. Both halves are
    # read: HF tables repeat them, but the maths must not rely on it.
    cs = (b * cs_sb + t * cs_st)[:, None] + cols[None, :]
    cs_mask = tok_mask[:, None] & col_mask[None, :]
    c1 = tl.load(cos_ptr + cs, mask=cs_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + half, mask=cs_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=cs_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + half, mask=cs_mask, other=0.0).to(tl.float32)
    _rotate_store(q1, q2, qo_ptr, b * qo_sb + t * qo_st, qo_sh, n_q_heads, c1, c2, s1, s2, half, cols,
                  tok_mask, col_mask, BLOCK_HQ, INVERSE)
    _rotate_store(k1, k2, ko_ptr, b * ko_sb + t * ko_st, ko_sh, n_k_heads, c1, c2, s1, s2, half, cols,
                  tok_mask, col_mask, BLOCK_HK, INVERSE)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, inverse: bool):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) into new contiguous tensors."""
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    B, T, n_q, D = q.shape
    n_k = k.shape[2]
    q_out = torch.empty((B, T, n_q, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, n_k, D), dtype=k.dtype, device=k.device)
    cs_sb = cos.stride(0) if cos.dim() == 3 else 0  # (T, D) tables broadcast over the batch
    block_hq, block_hk = next_pow2(n_q), next_pow2(max(n_k, 1))
    block_half = next_pow2(D // 2)
    # ~2048 query elements per program: two tokens at TinyLlama's 32 heads x 32, more for small models.
    tile = block_hq * block_half
    block_t = max(1, min(64, 2048 // tile))
    n_tokens = B * T
    if n_tokens:
        _rope_kernel[(cdiv(n_tokens, block_t),)](
            q, k, q_out, k_out, cos, sin, n_tokens, T,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            cs_sb, cos.stride(-2), n_q, n_k, D // 2,
            BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, INVERSE=inverse,
            num_warps=num_warps_for(block_t * tile))
    return q_out, k_out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        # An unused output arrives as zeros (autograd materialises missing gradients).
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq_out, dk_out, cos, sin, inverse=True)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) by cos/sin of (T, D) or (B, T, D); returns (q, k)."""
    check_launch("apply_rope", q, k, cos, sin)
    for arg, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float("apply_rope", arg, t)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"kernels.apply_rope: q and k must be (B, T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"kernels.apply_rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    if D % 2:
        raise ValueError(f"kernels.apply_rope: head dim must be even for rotate_half, got {D}")
    want = ((T, D), (B, T, D))
    if tuple(cos.shape) not in want or cos.shape != sin.shape:
        raise ValueError(f"kernels.apply_rope: cos and sin must both be (T, D)={want[0]} or (B, T, D)={want[1]}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()  # the kernel shares one set of strides
    return _RoPE.apply(q, k, cos, sin)
