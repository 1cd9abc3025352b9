"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

`rms_norm_reference` is the plain-PyTorch definition; `rms_norm` is the fused Triton version
(the whole row in registers, BLOCK_N = next_pow2(d); one row per program at d = 2048, a
few rows per program for small d). Forward saves x, weight and the fp32 1/rms per row;
backward recomputes x_hat and produces dx in one pass, with dweight summed in fp32 from
per-program partials. The backward is one wave of persistent programs, each prefetching its
next row while it works on the current one.
"""
import torch

from kernels._triton_utils import cdiv, check_float, check_launch, next_pow2, num_programs, num_warps_for, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, n_rows, n_cols, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(dy_ptr, x_ptr, rstd_ptr, rows, cols, row_end, col_mask, dy_row_stride, x_row_stride):
    """dy, x (storage dtype) and rstd of the given rows; rows at or past row_end read as zeros."""
    row_mask = rows < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    return dy, x, rstd


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                         dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A persistent program walks a contiguous range of rows, BLOCK_M at a time, and keeps its
    # share of dweight = sum_rows dy * x_hat in fp32 registers; the host sums the partials.
    # The loop is software-pipelined by hand: the next block's loads are issued before this
    # block's maths and stores, so every program always has a load in flight instead of
    # waiting out one memory round trip per row.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    rows = row_start + tl.arange(0, BLOCK_M)
    dy, x, rstd = _load_rows(dy_ptr, x_ptr, rstd_ptr, rows, cols, row_end, col_mask, dy_row_stride, x_row_stride)
    for _ in range(row_start, row_end, BLOCK_M):
        next_rows = rows + BLOCK_M
        dy_next, x_next, rstd_next = _load_rows(dy_ptr, x_ptr, rstd_ptr, next_rows, cols, row_end, col_mask,
                                                dy_row_stride, x_row_stride)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x_hat = x.to(tl.float32) * rstd[:, None]
        dyf = dy.to(tl.float32)
        dyw = dyf * w[None, :]
        # d/dx of x * rstd(x): rstd * (dyw - x_hat * mean(dyw * x_hat)), per row
        dx = rstd[:, None] * (dyw - x_hat * (tl.sum(dyw * x_hat, axis=1) / n_cols)[:, None])
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dyf * x_hat, axis=0)
        rows, dy, x, rstd = next_rows, dy_next, x_next, rstd_next
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)


# The backward is persistent: all its programs must be resident at once, or the last ones run
# as a second, mostly idle wave. Capping registers per thread makes that count exact:
# 65536 registers per SM / (cap * 32 threads * warps) programs per SM. The cap is 64 while a
# thread holds at most 8 elements of a row (d <= 4096: what those configs need anyway), 128
# beyond; tests/test_kernels_compile.py checks the configs compile under it without spills.
def _bwd_max_regs(block_m: int, block_n: int, warps: int) -> int:
    return 64 if block_m * block_n <= 8 * 32 * warps else 128


def _bwd_programs_per_sm(max_regs: int, warps: int) -> int:
    return max(1, 65536 // (max_regs * 32 * warps))


def _blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N = next_pow2(d), warps): one row per program at d=2048, more for small d."""
    block_n = next_pow2(n_cols)
    block_m = max(1, min(16, 2048 // block_n))
    return block_m, block_n, num_warps_for(block_m * block_n)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (rows, d) with a unit column stride; a view whenever the layout allows."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = _as_rows(x)
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_m, block_n, warps = _blocks(n_cols)
        if n_rows:
            _rms_norm_fwd_kernel[(cdiv(n_rows, block_m),)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _as_rows(dy)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        block_m, block_n, warps = _blocks(n_cols)
        row_blocks = cdiv(n_rows, block_m)
        max_regs = _bwd_max_regs(block_m, block_n, warps)
        programs = num_programs(row_blocks, x2.device, per_sm=_bwd_programs_per_sm(max_regs, warps))
        # Each program's row range is whole BLOCK_M blocks, so blocks never straddle programs.
        rows_per_program = cdiv(row_blocks, programs) * block_m
        # Every program writes its partial row; with no rows at all nothing would, hence zeros.
        alloc = torch.empty if n_rows else torch.zeros
        dw_partial = alloc((programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial,
                                              dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
                                              rows_per_program, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                              maxnreg=max_regs)
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dim of x (any leading shape); same maths as the reference."""
    check_launch("rms_norm", x, weight)
    check_float("rms_norm", "x", x)
    check_float("rms_norm", "weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"kernels.rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim, "
                         f"got {tuple(weight.shape)}")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))
