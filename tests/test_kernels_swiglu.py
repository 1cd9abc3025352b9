"""Triton SwiGLU against its PyTorch reference: output and both gradients, fp32 and bf16,
odd widths, gate/up as strided halves of one fused projection and a strided gradient,
both read in place (CPU interpreter)."""
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

swiglu_module = importlib.import_module("kernels.swiglu")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _run(fn, h, dy):
    """Split a fused projection h (..., 2n) into gate/up views, as the model does."""
    h = h.detach().clone().requires_grad_(True)
    gate, up = h.chunk(2, dim=-1)
    y = fn(gate, up)
    y.backward(dy)
    return y, h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 176), (37, 1500 + 7)])
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    *lead, n = shape
    h = (torch.randn(*lead, 2 * n) * 3).to(DEVICE, dtype)  # wide range: saturated and linear silu regions
    dy = torch.randn(shape).to(DEVICE, dtype)
    y, dh = _run(kernels.swiglu, h, dy)
    y_ref, dh_ref = _run(kernels.swiglu_reference, h, dy)
    assert y.dtype == dtype and dh.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dh, dh_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_strided_halves_and_strided_grad(dtype, monkeypatch):
    # gate/up are the halves of one (..., 2*33) projection (row stride 66, width 33) and dy a
    # slice of a wider buffer at an offset (row stride 99): the recorder checks that the
    # kernels read all three in place, with those strides.
    torch.manual_seed(2)
    h = (torch.randn(3, 5, 2 * 33) * 3).to(DEVICE, dtype)
    dy = torch.randn(3, 5, 3 * 33).to(DEVICE, dtype)[..., 33:66]
    fwd = record_launches(monkeypatch, swiglu_module, "_swiglu_fwd_kernel")
    bwd = record_launches(monkeypatch, swiglu_module, "_swiglu_bwd_kernel")
    y, dh = _run(kernels.swiglu, h, dy)
    y_ref, dh_ref = _run(kernels.swiglu_reference, h, dy)
    assert fwd.strides[0][:2] == [(66, 1), (66, 1)]
    assert bwd.strides[0][:3] == [(99, 1), (66, 1), (66, 1)]
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dh, dh_ref, **TOL[dtype])


def test_swiglu_contiguous_inputs_and_noncontiguous_grad():
    torch.manual_seed(1)
    gate = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    dy = torch.randn(33, 4, device=DEVICE).t()  # transposed: column stride != 1
    kernels.swiglu(gate, up).backward(dy)
    got = (gate.grad, up.grad)
    gate.grad = up.grad = None
    kernels.swiglu_reference(gate, up).backward(dy)
    torch.testing.assert_close(got, (gate.grad, up.grad), **TOL[torch.float32])


def test_swiglu_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        kernels.swiglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 9, device=DEVICE))
