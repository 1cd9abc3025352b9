"""Cross-entropy over (N, V) logits with ignore_index and optional z-loss, fp32 inside.

`cross_entropy_reference` is the plain-PyTorch definition; `cross_entropy` is the Triton
version, and its two row kernels are shared with the fused linear+CE:

- `ce_forward_rows`: one program per row streams the row once with an online logsumexp
  and writes the row's loss and lse (fp32).
- `ce_grad_rows`: one program per row writes d loss / d logits, optionally over the logits
  themselves (in place). The softmax is formed in fp32 and the one-hot subtracted there,
  so bf16 logits do not lose p - 1 to cancellation; only the finished gradient is rounded.

The mean's divisor (the number of non-ignored rows) stays on the device: no host sync.
Targets outside [0, V) that are not ignore_index are not checked (that would need a sync).
"""
import torch

from kernels._triton_utils import check_float, check_launch, num_warps_for, tl, triton

_MAX_BLOCK = 8192  # vocabulary columns per loop step; 32000 -> 4 steps of 8192


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            z_loss: float = 0.0) -> torch.Tensor:
    """Mean over non-ignored rows of lse - logit[target] + z_loss * lse^2; 0 if all are ignored."""
    logits = logits.float()
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    per_row = lse - target_logit
    if z_loss:
        per_row = per_row + z_loss * lse.pow(2)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)


@triton.jit
def _ce_fwd_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, lse_ptr, n_cols, ignore_index, z_loss,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * row_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # Online logsumexp: one exp per element, the running sum rescaled once per block.
    # The first block always holds a real column, so m is finite from then on.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target_logit = tl.load(logits_ptr + tl.where(valid, target, 0)).to(tl.float32)
    loss = lse - target_logit + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_grad_kernel(logits_ptr, logits_stride, grad_ptr, grad_stride, targets_ptr, lse_ptr, scale_ptr,
                    n_cols, ignore_index, z_loss, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    grad_ptr += row * grad_stride
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    # d/dx of (lse - x_t + z lse^2) = p * (1 + 2 z lse) - onehot(t), times grad_out / n_valid.
    valid = target != ignore_index
    scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    p_coef = 1.0 + 2.0 * z_loss * lse
    read_cols = tl.where(valid, n_cols, 0)  # an ignored row only gets zeros written: skip its reads
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        # Unread columns hold -inf, so exp(x - lse) is 0 there (never inf * 0 for any lse).
        x = tl.load(logits_ptr + cols, mask=cols < read_cols, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) * p_coef - tl.where(cols == target, 1.0, 0.0)
        tl.store(grad_ptr + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(n_cols))


def ce_forward_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float):
    """Per-row (loss, lse) in fp32 for 2-D logits with unit column stride."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = _block(n_cols)
    if n_rows:
        _ce_fwd_kernel[(n_rows,)](logits, logits.stride(0), targets, loss, lse, n_cols, ignore_index, z_loss,
                                  BLOCK=block, num_warps=num_warps_for(block))
    return loss, lse


def ce_grad_rows(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 ignore_index: int, z_loss: float, out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(logits) * scale into `out` (may be `logits` itself); ignored rows get 0."""
    n_rows, n_cols = logits.shape
    block = _block(n_cols)
    if n_rows:
        _ce_grad_kernel[(n_rows,)](logits, logits.stride(0), out, out.stride(0), targets, lse, scale, n_cols,
                                   ignore_index, z_loss, BLOCK=block, num_warps=num_warps_for(block))
    return out


def check_targets(name: str, targets: torch.Tensor, n_rows: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != (n_rows,):
        raise ValueError(f"kernels.{name}: targets must be an int64/int32 tensor of shape ({n_rows},), "
                         f"got {targets.dtype} {tuple(targets.shape)}")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        per_row, lse = ce_forward_rows(logits, targets, ignore_index, z_loss)
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index, ctx.z_loss = ignore_index, z_loss
        return per_row.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, n_valid = ctx.saved_tensors
        scale = grad_out.float() / n_valid
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        ce_grad_rows(logits, targets, lse, scale, ctx.ignore_index, ctx.z_loss, out=grad)
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  z_loss: float = 0.0) -> torch.Tensor:
    """Mean CE over non-ignored rows of logits (N, V), plus z_loss * lse^2; fp32 scalar."""
    check_launch("cross_entropy", logits, targets)
    check_float("cross_entropy", "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"kernels.cross_entropy: logits must be (N, V), got {tuple(logits.shape)}; "
                         "flatten the leading dims first")
    check_targets("cross_entropy", targets, logits.shape[0])
    return _CrossEntropy.apply(logits, targets, int(ignore_index), float(z_loss))
