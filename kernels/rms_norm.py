"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

`rms_norm_reference` is the plain-PyTorch definition; `rms_norm` is the fused Triton version
(one program per row, the whole row in registers: BLOCK = next_pow2(d)). Forward saves x,
weight and the fp32 1/rms per row; backward recomputes x_hat and produces dx in one pass,
with dweight summed in fp32 from per-program partials.
"""
import torch

from kernels._triton_utils import check_float, check_launch, num_programs, num_warps_for, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, n_cols, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * y_row_stride + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                         dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
                         BLOCK: tl.constexpr):
    # A persistent program walks a contiguous range of rows and keeps its share of
    # dweight = sum_rows dy * x_hat in fp32 registers; the host sums the partials.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Walk the rows by advancing 64-bit pointers (row * stride can exceed int32 on big batches).
    x_ptr += row_start * x_row_stride
    dy_ptr += row_start * dy_row_stride
    dx_ptr += row_start * dx_row_stride
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        dyw = dy * w
        # d/dx of x * rstd(x): rstd * (dyw - x_hat * mean(dyw * x_hat))
        dx = rstd * (dyw - x_hat * (tl.sum(dyw * x_hat, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        x_ptr += x_row_stride
        dy_ptr += dy_row_stride
        dx_ptr += dx_row_stride
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


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
        block = triton.next_power_of_2(n_cols)
        if n_rows:
            _rms_norm_fwd_kernel[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                            BLOCK=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _as_rows(dy)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        programs = num_programs(n_rows, x2.device)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows:
            _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial,
                                              dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
                                              triton.cdiv(n_rows, programs),
                                              BLOCK=block, num_warps=num_warps_for(block))
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
