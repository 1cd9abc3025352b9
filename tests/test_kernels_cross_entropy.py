"""Triton cross-entropy against its PyTorch reference: loss and d(logits), fp32 and bf16,
odd vocabularies, multi-block rows, ignore_index, z-loss, all-ignored batches and the
bf16 p - 1 cancellation, strided logits read in place (CPU interpreter)."""
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

ce_module = importlib.import_module("kernels.cross_entropy")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-3, rtol=2e-2)}


def _run(fn, logits, targets, **kw):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, targets, **kw)
    (loss * 3.0).backward()  # a grad_out other than 1 must be applied
    return loss, logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,vocab,z_loss,max_block", [
    (37, 1000 + 7, 0.0, None),   # odd vocabulary, one block per row
    (9, 1000 + 7, 1e-4, 128),    # eight blocks per row (online logsumexp across blocks), z-loss
])
def test_cross_entropy_matches_reference(n_rows, vocab, z_loss, max_block, dtype, monkeypatch):
    if max_block:
        monkeypatch.setattr(ce_module, "_MAX_BLOCK", max_block)
    torch.manual_seed(0)
    logits = (torch.randn(n_rows, vocab) * 4).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (n_rows,)).to(DEVICE)
    targets[::4] = -100  # ignored rows
    loss, grad = _run(kernels.cross_entropy, logits, targets, z_loss=z_loss)
    loss_ref, grad_ref = _run(kernels.cross_entropy_reference, logits, targets, z_loss=z_loss)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])
    assert grad[::4].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_strided_logits_read_in_place(dtype, monkeypatch):
    # Logits are columns 5..5+V of a wider buffer (row stride V + 13, as a padded-vocabulary
    # head would give), targets every other element of a longer vector. The recorder checks
    # that both kernels read the logits through that row stride, without a copy.
    monkeypatch.setattr(ce_module, "_MAX_BLOCK", 64)  # several blocks per row
    V = 201
    torch.manual_seed(4)
    base = (torch.randn(11, V + 13) * 4).to(DEVICE, dtype)
    targets = torch.randint(0, V, (22,)).to(DEVICE)[::2]
    targets[3] = -100
    fwd = record_launches(monkeypatch, ce_module, "_ce_fwd_kernel")
    grad_kernel = record_launches(monkeypatch, ce_module, "_ce_grad_kernel")

    def run(fn):
        leaf = base.detach().clone().requires_grad_(True)
        loss = fn(leaf[:, 5:5 + V], targets)
        (loss * 3.0).backward()
        return loss, leaf.grad

    loss, grad = run(kernels.cross_entropy)
    loss_ref, grad_ref = run(kernels.cross_entropy_reference)
    assert fwd.strides[0][0] == (V + 13, 1) and grad_kernel.strides[0][0] == (V + 13, 1)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])
    assert grad[:, :5].abs().sum() == 0 and grad[:, 5 + V:].abs().sum() == 0


def test_cross_entropy_custom_ignore_index():
    torch.manual_seed(1)
    logits, targets = torch.randn(6, 50, device=DEVICE), torch.tensor([3, 7, 7, 0, 49, 7], device=DEVICE)
    loss, grad = _run(kernels.cross_entropy, logits, targets, ignore_index=7)
    loss_ref, grad_ref = _run(kernels.cross_entropy_reference, logits, targets, ignore_index=7)
    torch.testing.assert_close((loss, grad), (loss_ref, grad_ref), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_all_ignored_is_zero_not_nan(dtype):
    logits = torch.randn(5, 33).to(DEVICE, dtype)
    loss, grad = _run(kernels.cross_entropy, logits, torch.full((5,), -100, device=DEVICE), z_loss=1e-4)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


def test_cross_entropy_bf16_confident_target_keeps_small_gradient():
    # p(target) = 1 - 6.1e-3: bf16 holds p only to steps of 2^-8 near 1, so p - 1 formed in bf16
    # is off by tens of percent. Forming p - 1 in fp32 and rounding once keeps it to ~0.4%.
    vocab = 1000
    logits = torch.zeros(2, vocab)
    logits[:, 5] = 12.0
    targets = torch.tensor([5, 5], device=DEVICE)
    _, grad = _run(kernels.cross_entropy, logits.to(DEVICE, torch.bfloat16), targets)
    exact = (torch.softmax(logits.double(), -1)[:, 5] - 1) * 1.5  # grad_out 3 / 2 valid rows
    naive = (torch.softmax(logits.bfloat16(), -1)[:, 5] - 1).double() * 1.5
    assert ((naive - exact).abs() / exact.abs()).min() > 0.1  # the cancellation this guards against
    torch.testing.assert_close(grad[:, 5].double().cpu(), exact, rtol=1e-2, atol=0)


def test_cross_entropy_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets must be"):
        kernels.cross_entropy(torch.randn(4, 10, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE))
