"""Triton RMSNorm against its PyTorch reference: output, dx and dweight, fp32 and bf16,
odd widths and row counts, strided input and gradient read in place (Triton runs on the CPU interpreter)."""
import os

import torch

# Without a GPU the Triton kernels run on the CPU interpreter (set before triton is imported).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib

import pytest
from conftest import record_launches

import kernels

rms_norm_module = importlib.import_module("kernels.rms_norm")

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_strided_input_and_grad_and_large_eps(dtype, monkeypatch):
    # x is a column slice of a wider buffer (row stride 96, width 48), as a view of a fused
    # projection, and dy another (row stride 144, at an offset). Neither is copied on the way:
    # the launch recorder checks that the kernels receive those strides.
    torch.manual_seed(1)
    base = torch.randn(3, 7, 2 * 48).to(DEVICE, dtype)
    w = torch.randn(48).to(DEVICE, dtype)
    dy = torch.randn(3, 7, 3 * 48).to(DEVICE, dtype)[..., 48:96]
    assert dy.stride(-2) == 144
    fwd = record_launches(monkeypatch, rms_norm_module, "_rms_norm_fwd_kernel")
    bwd = record_launches(monkeypatch, rms_norm_module, "_rms_norm_bwd_kernel")

    def run(fn):
        leaf = base.detach().clone().requires_grad_(True)  # contiguous; the slice below is the view
        wl = w.detach().clone().requires_grad_(True)
        y = fn(leaf[..., :48], wl, 0.5)
        y.backward(dy)
        return y, leaf.grad, wl.grad

    y, dbase, dw = run(kernels.rms_norm)
    y_ref, dbase_ref, dw_ref = run(kernels.rms_norm_reference)
    assert (96, 1) in fwd.strides[0]
    assert (144, 1) in bwd.strides[0] and (96, 1) in bwd.strides[0]
    for got, want in ((y, y_ref), (dbase, dbase_ref), (dw, dw_ref)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert dbase[..., 48:].abs().sum() == 0


def test_rms_norm_empty_batch_gives_zero_weight_grad():
    x = torch.randn(0, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    kernels.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-5)
