"""Triton RoPE against its PyTorch reference: rotated q/k and the gradient into the fused
qkv projection they are sliced from, GQA head counts, (T, D) and per-row (B, T, D) tables,
odd head dims, fp32 and bf16, strided q/k and gradients read in place (CPU interpreter)."""
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

rope_module = importlib.import_module("kernels.rope")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _tables(positions: torch.Tensor, D: int):
    """HF tables: angles for D/2 frequencies, repeated for both halves."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _run(fn, qkv, n_q, n_k, cos, sin, dq, dk):
    """Slice q/k out of one (B, T, Hq + 2Hk, D) projection as the model does; grad into it."""
    qkv = qkv.detach().clone().requires_grad_(True)
    q, k, _ = qkv.split([n_q, n_k, n_k], dim=2)
    q_rot, k_rot = fn(q, k, cos, sin)
    torch.autograd.backward((q_rot, k_rot), (dq, dk))
    return q_rot, k_rot, qkv.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,n_q,n_k,D,per_row", [
    (2, 5, 4, 2, 16, False),   # training: one (T, D) table for the batch
    (1, 7, 3, 1, 10, False),   # odd: 3 query heads, half dim 5 (not a power of two)
    (3, 4, 4, 2, 8, True),     # generation: per-row positions, (B, T, D) tables
    (1, 3, 32, 4, 64, False),  # TinyLlama heads: 2 tokens per program, a ragged last program
])
def test_rope_matches_reference(B, T, n_q, n_k, D, per_row, dtype):
    torch.manual_seed(0)
    qkv = torch.randn(B, T, n_q + 2 * n_k, D).to(DEVICE, dtype)
    positions = torch.randint(0, 100, (B, T)) if per_row else torch.arange(T) + 3
    cos, sin = _tables(positions, D)
    dq, dk = torch.randn(B, T, n_q, D).to(DEVICE, dtype), torch.randn(B, T, n_k, D).to(DEVICE, dtype)
    q, k, dqkv = _run(kernels.apply_rope, qkv, n_q, n_k, cos, sin, dq, dk)
    q_ref, k_ref, dqkv_ref = _run(kernels.apply_rope_reference, qkv, n_q, n_k, cos, sin, dq, dk)
    assert q.dtype == dtype and k.dtype == dtype and dqkv.dtype == dtype
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    torch.testing.assert_close(dqkv, dqkv_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_strided_grads_read_in_place(dtype, monkeypatch):
    # q/k are slices of the fused qkv (token stride (3 + 2) * 8 = 40); dq/dk are slices of one
    # (B, T, 3 + 1 + 2, 8) buffer (token stride 48, dk at an offset), unlike the contiguous
    # gradients above. The recorder checks that the kernel receives exactly those views.
    B, T, n_q, n_k, D = 2, 5, 3, 1, 8
    torch.manual_seed(3)
    qkv = torch.randn(B, T, n_q + 2 * n_k, D).to(DEVICE, dtype)
    cos, sin = _tables(torch.randint(0, 100, (B, T)), D)
    dq, dk, _ = torch.randn(B, T, n_q + n_k + 2, D).to(DEVICE, dtype).split([n_q, n_k, 2], dim=2)
    launches = record_launches(monkeypatch, rope_module, "_rope_kernel")
    q, k, dqkv = _run(kernels.apply_rope, qkv, n_q, n_k, cos, sin, dq, dk)
    q_ref, k_ref, dqkv_ref = _run(kernels.apply_rope_reference, qkv, n_q, n_k, cos, sin, dq, dk)
    forward, backward = launches.strides
    assert forward[:2] == [(T * 40, 40, 8, 1)] * 2
    assert backward[:2] == [dq.stride(), dk.stride()] == [(T * 48, 48, 8, 1)] * 2
    torch.testing.assert_close((q, k, dqkv), (q_ref, k_ref, dqkv_ref), **TOL[dtype])


def test_rope_general_tables_and_unused_k():
    # Tables whose halves differ (not HF-shaped) still follow the reference formula exactly,
    # and an unused k output (zero gradient) is handled.
    torch.manual_seed(1)
    q = torch.randn(2, 3, 2, 6, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 3, 1, 6, device=DEVICE, requires_grad=True)
    cos, sin = torch.randn(3, 6, device=DEVICE), torch.randn(3, 6, device=DEVICE)
    q_rot, k_rot = kernels.apply_rope(q, k, cos, sin)
    q_ref, k_ref = kernels.apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close((q_rot, k_rot), (q_ref, k_ref), **TOL[torch.float32])
    (q_rot * 2).sum().backward()
    got = q.grad.clone()
    assert k.grad is not None and k.grad.abs().sum() == 0
    q.grad = None
    (q_ref * 2).sum().backward()
    torch.testing.assert_close(got, q.grad, **TOL[torch.float32])


def test_rope_rejects_bad_tables():
    q, k = torch.randn(1, 4, 2, 8, device=DEVICE), torch.randn(1, 4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos and sin"):
        kernels.apply_rope(q, k, torch.randn(5, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE))
