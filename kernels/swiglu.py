"""SwiGLU activation: silu(gate) * up, in fp32 inside.

`swiglu_reference` is the plain-PyTorch definition; `swiglu` is the fused Triton version.
gate and up are usually the two halves of one fused (..., 2*ffn) projection, so their rows
are strided: the kernels take a row stride and read them in place (no copy). Only gate
and up are saved for backward (they are views of the projection output, which autograd
keeps anyway); silu is recomputed there instead of storing another activation.
"""
import torch
import torch.nn.functional as F

from kernels._triton_utils import cdiv, check_float, check_launch, next_pow2, tl, triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@triton.jit
def _tile(row_block, col_block, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64), column indices and mask of this program's (BLOCK_M, BLOCK_N) tile."""
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, g_row_stride, u_row_stride, y_row_stride, n_rows, n_cols,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + rows * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, dy_row_stride, g_row_stride, u_row_stride,
                       out_row_stride, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # silu'(g) = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(dg_ptr + rows * out_row_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows * out_row_stride + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) with a unit column stride; a view for chunk()-ed projections."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _block_cols(n_cols: int) -> int:
    """Tile width: up to 1024 columns, narrowed to 512 or 256 when that pads fewer columns
    (ffn 5632 = 11 x 512 exactly, but 5.5 x 1024: a half-masked tile in every sixth program)."""
    widest = min(1024, next_pow2(n_cols))
    candidates = [b for b in (widest, widest // 2, widest // 4) if b >= min(widest, 256)]
    return min(candidates, key=lambda b: (cdiv(n_cols, b) * b - n_cols, -b))


def _launch_config(n_rows: int, n_cols: int):
    """Tiles of 1024 elements for 4 warps: (2 rows x 512 cols) at ffn 5632, more rows when narrow.

    Small programs keep the SMs full: each thread moves one 16-byte vector per tensor (bf16),
    and at ~40 registers a 128-thread program leaves room for 10+ resident programs per SM,
    where a 16-warp program of the same register count fits only twice.
    """
    block_n = _block_cols(n_cols)
    block_m = max(1, min(64, 1024 // block_n))
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))  # axis 1 is <= 65535
    return grid, dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _as_rows(gate), _as_rows(up)
        n_rows, n_cols = g2.shape
        y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        grid, meta = _launch_config(n_rows, n_cols)
        if y.numel():
            _swiglu_fwd_kernel[grid](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n_rows, n_cols, **meta)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        n_rows, n_cols = g2.shape
        dy2 = _as_rows(dy)
        dg = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty((n_rows, n_cols), dtype=u2.dtype, device=u2.device)
        grid, meta = _launch_config(n_rows, n_cols)
        if dg.numel():
            _swiglu_bwd_kernel[grid](dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0),
                                     dg.stride(0), n_rows, n_cols, **meta)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shaped gate/up (any leading shape); output in gate's dtype."""
    check_launch("swiglu", gate, up)
    check_float("swiglu", "gate", gate)
    check_float("swiglu", "up", up)
    if gate.shape != up.shape:
        raise ValueError(f"kernels.swiglu: gate and up must have the same shape, got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"kernels.swiglu: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    return _SwiGLU.apply(gate, up)
