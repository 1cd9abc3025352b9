"""Mistral's sliding window in every attention path that runs on a CPU: the SDPA mask against a
naive loop, attention within documents (dense mask) against each document computed alone with
the window (flex_attention against the dense mask: tests/test_document_mask.py), and KV-cache decoding against the full forward. (Parity with
transformers' MistralForCausalLM: tests/test_hf_architectures.py; flash-attn's window_size is
checked on a GPU.)"""
from __future__ import annotations

import math

import pytest
import torch
from test_document_mask import split, three_documents

from model import Config, Llama
from model.attention import attention

EOS = 2
WINDOW = 5


def windowed_model(window=WINDOW, seed=0) -> Llama:
    torch.manual_seed(seed)
    config = Config.from_name("tiny", architecture="MistralForCausalLM", sliding_window=window)
    return Llama(config, kernels="torch").float()


def naive_attention(q, k, v, window):
    """Loops over queries: query i (aligned to the last of S keys) sees keys i-window+1 .. i."""
    B, T, H, D = q.shape
    S, groups = k.shape[1], q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    for i in range(T):
        pos = S - T + i
        lo = max(0, pos - window + 1)
        keys = k[:, lo:pos + 1].repeat_interleave(groups, dim=2)
        values = v[:, lo:pos + 1].repeat_interleave(groups, dim=2)
        scores = torch.einsum("bhd,bshd->bhs", q[:, i], keys) / math.sqrt(D)
        out[:, i] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("T, S", [(12, 12), (3, 12)])
def test_sdpa_window_matches_a_naive_loop(T, S):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, T, 4, 8, generator=g), torch.randn(2, S, 2, 8, generator=g), torch.randn(2, S, 2, 8, generator=g)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", window=WINDOW), naive_attention(q, k, v, WINDOW),
                               rtol=0, atol=1e-5)
    # a window as long as the keys limits nothing
    if T == S:
        torch.testing.assert_close(attention(q, k, v, backend="sdpa", window=S), attention(q, k, v, backend="sdpa"))


@torch.no_grad()
def test_each_document_is_computed_alone_with_the_window():
    model = windowed_model()
    x, _, lengths = three_documents()
    masked = model(x, documents=split(model, x))
    alone = torch.cat([model(part) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    # the window matters here: without it the documents longer than it come out differently
    unwindowed = windowed_model(window=None)
    assert (unwindowed(x, documents=split(unwindowed, x)) - masked).abs().max() > 1e-3


@torch.no_grad()
def test_kv_cache_decoding_with_the_window_matches_the_full_forward():
    from finetune.generate import generate_batch

    model = windowed_model().eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (9, 4)]
    rows = generate_batch(model, prompts, 12, eos_id=-1, pad_id=0)
    for prompt, row in zip(prompts, rows):  # greedy again, one full forward per token, no cache
        ids = list(prompt)
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert row == ids[len(prompt):]


def test_a_window_needs_the_mistral_architecture():
    with pytest.raises(ValueError, match="sliding_window .*needs architecture MistralForCausalLM"):
        Config.from_name("tiny", sliding_window=8)
    assert Config.from_name("tiny", architecture="MistralForCausalLM", sliding_window=8).sliding_window == 8
