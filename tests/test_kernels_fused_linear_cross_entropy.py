"""Triton fused linear+cross-entropy against lm_head matmul + reference CE: loss and the
gradients of hidden and weight, fp32 and bf16, odd sizes, several chunks with a ragged tail,
ignore_index, z-loss, all-ignored batches, frozen weight, autocast (CPU interpreter)."""
import os

import torch

# Without a GPU the Triton kernels run on the CPU interpreter (set before triton is imported).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib

import pytest

import kernels

flce_module = importlib.import_module("kernels.fused_linear_cross_entropy")


def _run(fn, hidden, weight, targets, grad_out=2.0, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = fn(hidden, weight, targets, **kw)
    (loss * grad_out).backward()
    return loss, hidden.grad, weight.grad


def _assert_close(got, want, dtype):
    """Tolerance relative to the tensor's scale: gradients here are O(1 / tokens)."""
    scale = want.abs().max().item() or 1.0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol)


def _inputs(n, d, vocab, dtype, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, d).to(DEVICE, dtype)
    weight = (torch.randn(vocab, d) / d ** 0.5 * 3).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (n,)).to(DEVICE)
    targets[1::5] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows,z_loss", [(None, 0.0), (8, 1e-4)])  # one chunk / 5 chunks, tail of 5
def test_fused_linear_ce_matches_reference(chunk_rows, z_loss, dtype):
    hidden, weight, targets = _inputs(37, 24, 1000 + 7, dtype)
    got = _run(kernels.fused_linear_cross_entropy, hidden, weight, targets, z_loss=z_loss, chunk_rows=chunk_rows)
    want = _run(kernels.fused_linear_cross_entropy_reference, hidden, weight, targets, z_loss=z_loss)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    torch.testing.assert_close(got[0], want[0], atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=1e-4)
    for g, w in zip(got[1:], want[1:]):
        _assert_close(g, w, dtype)
    assert torch.all(got[1][1::5] == 0)  # ignored rows send no gradient to their hidden state


def test_fused_linear_ce_all_ignored_is_zero_not_nan():
    hidden, weight, _ = _inputs(6, 8, 40, torch.float32)
    loss, dh, dw = _run(kernels.fused_linear_cross_entropy, hidden, weight, torch.full((6,), -100, device=DEVICE),
                        z_loss=1e-4, chunk_rows=4)
    assert loss.item() == 0.0
    assert torch.all(dh == 0) and torch.all(dw == 0)


def test_fused_linear_ce_frozen_weight_and_no_grad():
    hidden, weight, targets = _inputs(10, 8, 50, torch.float32)
    h = hidden.clone().requires_grad_(True)
    kernels.fused_linear_cross_entropy(h, weight, targets, chunk_rows=3).backward()
    h_ref = hidden.clone().requires_grad_(True)
    kernels.fused_linear_cross_entropy_reference(h_ref, weight, targets).backward()
    _assert_close(h.grad, h_ref.grad, torch.float32)
    with torch.no_grad():  # loss only, e.g. evaluation or SPIN's reference model
        loss = kernels.fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=3)
    torch.testing.assert_close(loss, kernels.fused_linear_cross_entropy_reference(hidden, weight, targets))


def test_fused_linear_ce_under_autocast_matches_reference():
    # fp32 master weights + bf16 autocast (Fabric "bf16-mixed"): matmuls in bf16, grads in fp32.
    hidden, weight, targets = _inputs(12, 16, 70, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _run(kernels.fused_linear_cross_entropy, hidden, weight, targets, chunk_rows=5)
        want = _run(kernels.fused_linear_cross_entropy_reference, hidden, weight, targets)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    for g, w in zip(got[1:], want[1:]):
        _assert_close(g, w, torch.bfloat16)


def test_weight_gradient_accumulates_over_chunks_in_fp32():
    # 48 chunks of 2 rows: summing the chunk products in bf16 would drift (~1e-2 of the scale,
    # shown below); summed in fp32 and rounded once, the gradient stays near bf16 precision.
    torch.manual_seed(0)
    n, d, vocab, chunk = 96, 16, 64, 2
    hidden, weight = torch.randn(n, d).bfloat16(), (torch.randn(vocab, d) / 4).bfloat16()
    targets = torch.randint(0, vocab, (n,))
    w64 = weight.double().requires_grad_(True)
    kernels.cross_entropy_reference(hidden.double() @ w64.t(), targets).backward()
    truth = w64.grad

    def rel_err(grad):
        return ((grad.double().cpu() - truth).abs().max() / truth.abs().max()).item()

    bf16_sum = torch.zeros(vocab, d, dtype=torch.bfloat16)
    for i in range(0, n, chunk):
        p = torch.softmax(hidden[i:i + chunk].float() @ weight.float().t(), -1)
        p[torch.arange(chunk), targets[i:i + chunk]] -= 1
        bf16_sum += (p / n).bfloat16().t() @ hidden[i:i + chunk]
    assert rel_err(bf16_sum) > 8e-3

    w = weight.to(DEVICE).requires_grad_(True)
    kernels.fused_linear_cross_entropy(hidden.to(DEVICE), w, targets.to(DEVICE), chunk_rows=chunk).backward()
    assert rel_err(w.grad) < 8e-3


def test_chunk_size_bounds_the_logits_memory():
    rows = flce_module._chunk_rows(16 * 2048, 32000, 2)
    assert rows * 32000 * 2 <= flce_module._CHUNK_BYTES
    assert (16 * 2048) % rows == 0  # equal chunks: no tiny tail GEMM
    assert flce_module._chunk_rows(37, 10**9, 4) == 1  # never zero rows


def test_fused_linear_ce_rejects_mismatched_dtypes():
    with pytest.raises(TypeError, match="same dtype"):
        kernels.fused_linear_cross_entropy(torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE).bfloat16(),
                                           torch.zeros(3, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_in_uneven_vocabulary_slices_matches_reference(monkeypatch, dtype):
    # 24 columns x 2 bytes x 100 rows: 1007 vocabulary rows in 11 slices of 92 (the last 87).
    monkeypatch.setattr(flce_module, "_DW_SLICE_BYTES", 24 * 2 * 100)
    assert flce_module._slice_rows(1007, 24, 2) == 92
    hidden, weight, targets = _inputs(37, 24, 1000 + 7, dtype, seed=3)
    got = _run(kernels.fused_linear_cross_entropy, hidden, weight, targets, chunk_rows=8)
    want = _run(kernels.fused_linear_cross_entropy_reference, hidden, weight, targets)
    for g, w in zip(got[1:], want[1:]):
        _assert_close(g, w, dtype)


def test_weight_gradient_slice_bounds_the_temporary():
    rows = flce_module._slice_rows(32000, 2048, 2)
    assert rows * 2048 * 2 <= flce_module._DW_SLICE_BYTES
    assert 32000 % rows == 0  # equal slices
    assert flce_module._slice_rows(5, 10**9, 4) == 1
