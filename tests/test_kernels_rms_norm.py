"""Triton RMSNorm against its PyTorch reference: output, dx and dweight, fp32 and bf16,
odd widths and row counts, non-contiguous input (Triton runs on the CPU interpreter)."""
import os

import torch

# Without a GPU the Triton kernels run on the CPU interpreter (set before triton is imported).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kernels

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _run(fn, x, w, eps, dy):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 50, 40), (37, 123)])  # 150 rows: 3 row blocks per backward program
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(DEVICE, dtype)
    dy = torch.randn(shape).to(DEVICE, dtype)
    y, dx, dw = _run(kernels.rms_norm, x, w, 1e-5, dy)
    y_ref, dx_ref, dw_ref = _run(kernels.rms_norm_reference, x, w, 1e-5, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    torch.testing.assert_close(dw, dw_ref, **TOL[dtype])


def test_rms_norm_strided_input_and_large_eps():
    # A column slice has a row stride larger than its width, as a view of a fused projection.
    torch.manual_seed(1)
    base = torch.randn(3, 7, 2 * 48, device=DEVICE)
    x = base[..., :48]
    w = torch.randn(48, device=DEVICE)
    dy = torch.randn(3, 7, 48, device=DEVICE)
    y, dx, dw = _run(kernels.rms_norm, x, w, 0.5, dy)
    y_ref, dx_ref, dw_ref = _run(kernels.rms_norm_reference, x, w, 0.5, dy)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_rms_norm_empty_batch_gives_zero_weight_grad():
    x = torch.randn(0, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    kernels.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-5)
