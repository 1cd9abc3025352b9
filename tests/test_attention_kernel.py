"""The attention kernel by measurement (issue 26, item 4): the choice from injected timings,
the SDPA priority it sets, what the run log names; attention within documents builds its
mask without a host sync and once per forward."""
from __future__ import annotations

import math

import pytest
import torch

import model.attention as attention
import model.flash_attn as flash_attn
from model import Config, Llama
from model.document_mask import Documents, document_attention_backend

# The H200 figures of docs/benchmarks.md (ms, micro-batch 8 x 2048, 32/4 heads of 64, fwd+bwd).
H200 = {"flash-attn": 2.318, "sdpa-cudnn": 1.450, "sdpa-flash": 2.318, "sdpa-efficient": 5.144, "sdpa-math": None}


@pytest.fixture
def restore_selection():
    yield
    attention.use_attention_kernel(None)


def test_the_fastest_kernel_wins_ties_in_order_and_refusals_are_left_out():
    assert attention.choose_attention_kernel(H200) == "sdpa-cudnn"
    assert attention.choose_attention_kernel({"sdpa-flash": 1.0, "flash-attn": 1.0}) == "flash-attn"
    assert attention.choose_attention_kernel({"sdpa-cudnn": math.inf, "sdpa-math": 9.0}) == "sdpa-math"
    with pytest.raises(RuntimeError, match="no attention kernel ran"):
        attention.choose_attention_kernel({"sdpa-cudnn": None})


def test_selection_on_cuda_puts_the_winner_first_and_the_log_names_it(restore_selection):
    from torch.nn.attention import SDPBackend

    seen = []

    def fake_measure(*args):
        seen.append(args[2:])
        return dict(H200)

    summed = lambda t: {k: None if v is None else 2 * v for k, v in t.items()}  # noqa: E731 - two ranks
    kernel, timings = attention.select_attention_kernel("cuda", torch.bfloat16, 8, 2048, 32, 4, 64,
                                                        measure=fake_measure, agree=summed)
    assert kernel == "sdpa-cudnn" and timings["sdpa-cudnn"] == 2.9 and seen == [(8, 2048, 32, 4, 64)]
    assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert attention.attention_backend("cuda", torch.bfloat16) == "sdpa-cudnn (measured)"



def test_a_measured_sdpa_kernel_is_used_even_where_flash_attn_imports(monkeypatch, restore_selection):
    calls = []
    monkeypatch.setattr(attention, "flash_attn_usable", lambda q: True)
    monkeypatch.setattr(attention, "flash_attn_func", lambda *a, **k: calls.append(1) or a[0])
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    attention.attention(q, k, k)
    assert calls == [1]  # without a selection flash-attn runs where it imports
    attention.use_attention_kernel("sdpa-cudnn")  # measured faster
    out = attention.attention(q, k, k)
    assert calls == [1] and out.shape == q.shape


def test_no_measurement_on_cpu():
    calls = []
    kernel, timings = attention.select_attention_kernel("cpu", torch.float32, 1, 16, 4, 2, 16,
                                                        measure=lambda *a: calls.append(a))
    assert calls == [] and timings == {} and kernel == "sdpa"


def test_measurement_runs_each_kernel_or_records_its_refusal():
    ms = attention.measure_attention_kernels("cpu", torch.float32, 1, 16, 4, 2, 8, reps=1)
    assert set(ms) == set(attention.KERNELS)
    assert ms["sdpa-math"] is not None and ms["sdpa-math"] > 0
    assert ms["flash-attn"] is None and ms["sdpa-cudnn"] is None  # no CUDA here


class HostReads:
    """Counts Tensor -> Python conversions and nonzero calls (each a host sync on CUDA)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.reads = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", torch.nonzero))

    def _wrap(self, name, original):
        return lambda *a, **k: (self.reads.append(name), original(*a, **k))[1]


@pytest.mark.parametrize("kernel", ["flex", "sdpa-mask"])
def test_documents_are_built_without_a_host_sync(monkeypatch, kernel):
    ids = torch.tensor([[5, 6, 2, 7, 8, 9, 2, 4] * 2, [2, 3, 3, 3, 2, 3, 3, 3] * 2])
    reads = HostReads(monkeypatch)
    docs = Documents(ids, eos_id=2, backend=kernel)
    assert reads.reads == [], reads.reads
    monkeypatch.undo()
    assert docs.positions[0, :4].tolist() == [0, 1, 2, 0]


def test_the_model_builds_no_documents_of_its_own(monkeypatch):
    import model.document_mask as dm

    built = []
    original = dm.Documents.__init__
    monkeypatch.setattr(dm.Documents, "__init__", lambda self, *a, **k: (built.append(1), original(self, *a, **k))[1])
    config = Config.from_name("tiny", block_size=16)
    m = Llama(config, kernels="torch")
    ids = torch.randint(3, config.vocab_size, (2, 16))
    m(ids, targets=ids, documents=Documents(ids, eos_id=2, backend="sdpa-mask")).backward()
    assert len(built) == 1 and config.n_layer > 1  # the caller's, shared by every layer


def test_flex_is_the_default_on_cuda_even_with_flash_attn(monkeypatch):
    monkeypatch.setattr(flash_attn, "HAS_FLASH_ATTN", True)
    assert document_attention_backend(torch.device("cuda"), torch.bfloat16) == "flex"
    assert document_attention_backend(torch.device("cpu"), torch.float32) == "sdpa-mask"
