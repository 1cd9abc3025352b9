"""Attention within documents (--document-mask): each document of a window is computed
exactly as if it were alone (logits, per-token losses and gradients), for every kernel that
runs on a CPU; a window without EOS is plain causal attention; misuse is refused."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.shards import write_shard
from model import Config, Llama
from model.document_mask import Documents, document_attention_backend

EOS = 2
ROOT = Path(__file__).resolve().parents[1]


def tiny_model():
    torch.manual_seed(0)
    return Llama(Config.from_name("tiny"), kernels="torch").float()


def split(model, x, backend="sdpa-mask"):
    """The documents of batch `x` (ending with EOS), as the pretraining loop builds them for `model`."""
    return Documents(x, EOS, backend, window=model.config.sliding_window)


def three_documents(seed=0):
    """One window of 40 tokens: the tail of a document, a whole one, and the start of a third."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 512, (n,), generator=g) for n in (9, 17, 14)]
    docs[0][-1] = EOS
    docs[1][-1] = EOS
    x = torch.cat(docs)[None]
    y = torch.randint(3, 512, (1, x.shape[1]), generator=g)
    return x, y, [d.numel() for d in docs]


def test_positions_and_documents_restart_after_each_eos():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    docs = Documents(x, EOS, "sdpa-mask")
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert docs.doc_ids.tolist() == [[1, 1, 1, 2, 2, 3, 4, 4]]
    assert torch.equal(docs.dense_mask[0, 0, 4], torch.tensor([False, False, False, True, True, False, False, False]))
    # flash-attn's packed layout: row b's tokens are [8b, 8b + 8); every document is one sequence
    packed = Documents(torch.cat([x, x]), EOS, "flash-varlen")
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 11, 13, 14, 16]
    assert packed.cu_seqlens.dtype == torch.int32


def test_each_document_is_computed_as_if_alone():
    model = tiny_model()
    x, y, lengths = three_documents()
    logits = model(x, documents=split(model, x))
    losses = F.cross_entropy(logits[0], y[0], reduction="none")
    losses.sum().backward()
    masked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    alone_logits, total = [], 0.0
    for xs, ys in zip(x.split(lengths, dim=1), y.split(lengths, dim=1)):
        out = model(xs)  # plain causal attention, positions from 0
        alone_logits.append(out)
        total = total + F.cross_entropy(out[0], ys[0], reduction="sum")
    total.backward()
    alone = torch.cat(alone_logits, dim=1)
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(losses, F.cross_entropy(alone[0], y[0], reduction="none"), rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(masked_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 5])  # 5: Mistral's sliding window, shorter than the documents
@torch.no_grad()
def test_flex_attention_kernel_matches_the_dense_mask(window):
    # FlexAttention has no backward on a CPU (its compiled CUDA kernel has): forward here.
    model = tiny_model() if window is None else Llama(
        Config.from_name("tiny", architecture="MistralForCausalLM", sliding_window=window), kernels="torch")
    x = torch.cat([three_documents(seed=s)[0] for s in (3, 4)])
    torch.testing.assert_close(model(x, documents=split(model, x, "flex")),
                               model(x, documents=split(model, x)), rtol=0, atol=1e-5)


def test_fused_loss_with_document_mask_equals_the_mean_of_documents_alone():
    model = tiny_model()
    x, y, lengths = three_documents(seed=1)
    masked = model(x, targets=y, documents=split(model, x))
    alone = sum(model(xs, targets=ys) * n for xs, ys, n in zip(x.split(lengths, 1), y.split(lengths, 1), lengths))
    torch.testing.assert_close(masked, alone / sum(lengths), rtol=0, atol=1e-5)


def test_a_window_without_eos_is_plain_causal_attention():
    model = tiny_model()
    x = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x, documents=split(model, x)), model(x), rtol=0, atol=1e-6)


def test_misuse_is_refused():
    model = tiny_model()
    x = torch.randint(3, 512, (1, 8))
    with pytest.raises(ValueError, match="KV cache"):
        model(x, documents=split(model, x), cache=model.make_kv_cache(1, 16))
    with pytest.raises(ValueError, match="flash-varlen"):
        document_attention_backend(torch.device("cpu"), torch.float32, "flash-varlen")
    assert document_attention_backend(torch.device("cpu"), torch.float32) == "sdpa-mask"


SHARD_EOS = 7  # the pretraining test's shards end documents with 7, not the usual 2: read from their headers


def _pretrain(tmp_path, name, *extra):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, 512, 30_000)
        tokens[rng.random(30_000) < 0.02] = SHARD_EOS  # documents of ~50 tokens
        write_shard(data / "a_00000.bin", tokens, vocab_size=512, eos_id=SHARD_EOS,
                    num_docs=int((tokens == SHARD_EOS).sum()))
    cmd = [sys.executable, str(ROOT / "pretrain" / "tinyllama.py"), "--config", "tiny", "--data", f"{data}:1",
           "--out", str(tmp_path / name), "--max-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "2",
           "--num-workers", "0", "--wandb-mode", "disabled", "--no-save", "--log-every", "1", "--seed", "5", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return proc.stdout + proc.stderr, [float(__import__("json").loads(ln)["loss"]) for ln in lines]


def per_document_loss(model, x, y, eos):
    """Mean token loss of windows x -> y with every document (ending at `eos`) run alone
    through plain causal attention: the reference, written without model/document_mask.py."""
    total, count = 0.0, 0
    for row_x, row_y in zip(x, y):
        ends = [i + 1 for i, t in enumerate(row_x.tolist()) if t == eos]
        bounds = [0] + [e for e in ends if e < len(row_x)] + [len(row_x)]
        for a, b in zip(bounds, bounds[1:]):
            logits = model(row_x[None, a:b])[0]
            total += F.cross_entropy(logits.float(), row_y[a:b], reduction="sum").item()
            count += b - a
    return total / count


@pytest.mark.slow
def test_pretraining_flag_prints_the_kernel_and_computes_the_loss_of_documents_alone(tmp_path):
    """Step 1's logged loss (the initial weights of --seed 5 on the first global batch) equals
    the loss of each document of those windows run alone, split at the shards' EOS id."""
    from pretrain.data import MixtureSampler, SourceSpec

    log, masked = _pretrain(tmp_path, "masked", "--document-mask")
    assert f"attention within documents (EOS id {SHARD_EOS}): kernel sdpa-mask" in log
    _, plain = _pretrain(tmp_path, "plain")
    assert len(masked) == len(plain) == 3
    model = Llama(Config.from_name("tiny"), kernels="torch")
    model.init_weights(seed=5)  # the engine's init: the weights depend on the seed only
    x, y = MixtureSampler([SourceSpec(tmp_path / "data", 1.0)], 128, 5, 512).batch(range(4))
    with torch.no_grad():
        expected = per_document_loss(model, x, y, SHARD_EOS)
        causal = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert abs(causal - expected) > 1e-3  # the windows hold several documents: the mask matters
    assert masked[0] == pytest.approx(expected, abs=1e-5)
    assert plain[0] == pytest.approx(causal, abs=1e-5)
    assert masked != plain  # same data and seed: only the attention differs
