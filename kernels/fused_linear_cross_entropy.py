"""lm_head matmul + cross-entropy; the fused version never materialises all logits.

`fused_linear_cross_entropy_reference` is the plain-PyTorch definition. The fused version
walks the tokens in chunks sized so one chunk's logits stay around `_CHUNK_BYTES`, and
does all the work in the forward pass, where the chunk's logits exist anyway:

    logits = hidden_c @ weight.T                      (cuBLAS)
    loss rows, lse  <- Triton row kernel              (kernels.cross_entropy)
    logits <- d loss / d logits, in place             (Triton, fp32 inside, 1/n_valid scale)
    grad_hidden_c = logits @ weight                   (cuBLAS, written into its slice)
    grad_weight  += logits.T @ hidden_c               (cuBLAS, summed over chunks in fp32)

Backward then only scales the two stored gradients by grad_output. Peak extra memory is
one chunk of logits plus the fp32 weight-gradient accumulator, instead of (N, V) logits
and their gradient. Under FSDP2 call it where the lm_head weight is unsharded (a plain
tensor, inside the module that owns it); a sharded DTensor is rejected with that advice.
"""
import torch

from kernels._triton_utils import check_float, check_launch
from kernels.cross_entropy import ce_forward_rows, ce_grad_rows, check_targets, cross_entropy_reference

_CHUNK_BYTES = 256 * 2**20  # logits per chunk: 4096 tokens x 32000 vocab in bf16
# A chunk's bf16 weight-gradient product is formed one vocabulary slice at a time before it
# is added into the fp32 accumulator: a (V, d) temporary would be 131 MB at 32000 x 2048.
_DW_SLICE_BYTES = 32 * 2**20


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                         ignore_index: int = -100, z_loss: float = 0.0) -> torch.Tensor:
    """hidden: (N, d), weight: (V, d), targets: (N,)."""
    return cross_entropy_reference(hidden @ weight.t(), targets, ignore_index, z_loss)


def _chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk: logits near _CHUNK_BYTES, chunks of equal size (no tiny tail GEMM)."""
    rows = max(1, min(n_rows, _CHUNK_BYTES // (vocab * itemsize)))
    n_chunks = -(-n_rows // rows)
    return max(1, -(-n_rows // n_chunks))


def _slice_rows(vocab: int, d: int, itemsize: int) -> int:
    """Vocabulary rows per weight-gradient slice: product near _DW_SLICE_BYTES, equal slices."""
    rows = max(1, min(vocab, _DW_SLICE_BYTES // (d * itemsize)))
    n_slices = -(-vocab // rows)
    return -(-vocab // n_slices)


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32) += grad_logits.T @ h for a low-precision chunk, slice by slice.

    cuBLAS sums the chunk's rows in fp32 and rounds the product once to the compute dtype;
    the in-place mixed-dtype add then sums chunks in fp32 without an fp32 copy of the
    product. Per chunk this moves the product once each way plus the accumulator once each
    way, and holds only one slice of the product.
    """
    vocab, d = grad_weight.shape
    rows = _slice_rows(vocab, d, h.element_size())
    buf = torch.empty((rows, d), dtype=h.dtype, device=h.device)
    for v0 in range(0, vocab, rows):
        v1 = min(v0 + rows, vocab)
        product = buf[:v1 - v0]
        torch.mm(grad_logits[:, v0:v1].t(), h, out=product)
        grad_weight[v0:v1].add_(product)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (as `hidden @ weight.T` would use), else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"kernels.fused_linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) "
                        "must have the same dtype (or run under autocast)")
    return hidden.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, chunk_rows, grad_enabled):
        # needs_input_grad follows requires_grad only; under torch.no_grad() (validation,
        # reference log-probs) no gradient is wanted, so none is computed.
        need_dh = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        dtype = _compute_dtype(hidden, weight)
        h_all, w = hidden.to(dtype), weight.to(dtype)  # no-ops unless autocast changes the dtype
        targets = targets.contiguous()
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_rows or _chunk_rows(n_rows, vocab, w.element_size())

        n_valid = (targets != ignore_index).sum().clamp(min=1)
        inv_n_valid = 1.0 / n_valid.float()  # the mean's factor, applied inside the grad kernel
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_dh else None
        grad_weight = None
        if need_dw:
            # fp32 accumulator across chunks; when the weight is fp32 it is the gradient itself.
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit from here
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                h, t = h_all[start:end], targets[start:end]
                logits = h @ w.t()
                loss_rows[start:end], lse = ce_forward_rows(logits, t, ignore_index, z_loss)
                if not (need_dh or need_dw):
                    continue
                ce_grad_rows(logits, t, lse, inv_n_valid, ignore_index, z_loss, out=logits)  # in place
                if need_dh:
                    torch.mm(logits, w, out=grad_hidden[start:end])
                if need_dw:
                    if dtype == torch.float32:
                        grad_weight.addmm_(logits.t(), h)
                    else:
                        _add_weight_grad(grad_weight, logits, h)
                del logits

        loss = loss_rows.sum() / n_valid
        if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Out of place, so a second backward (retain_graph=True) sees the unscaled gradients.
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_out.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, z_loss: float = 0.0, *,
                               chunk_rows: int | None = None) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` over non-ignored rows without building all the logits.

    hidden (N, d), weight (V, d), targets (N,). `chunk_rows` overrides the automatic chunk
    size (tests use it to exercise several chunks on small inputs).
    """
    if _is_dtensor(weight) or _is_dtensor(hidden):
        raise TypeError("kernels.fused_linear_cross_entropy: got a sharded DTensor; call it where the lm_head "
                        "weight is unsharded (inside the forward of the FSDP module that owns it)")
    check_launch("fused_linear_cross_entropy", hidden, weight, targets)
    check_float("fused_linear_cross_entropy", "hidden", hidden)
    check_float("fused_linear_cross_entropy", "weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"kernels.fused_linear_cross_entropy: need hidden (N, d) and weight (V, d), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    check_targets("fused_linear_cross_entropy", targets, hidden.shape[0])
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"kernels.fused_linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    # Grad mode is read here: inside autograd.Function.forward it is always off.
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), float(z_loss), chunk_rows,
                                          torch.is_grad_enabled())
