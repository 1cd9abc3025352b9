"""The Llama module: parameter count, causality, attention vs a naive reference, KV cache,
save/load, config presets and errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import Config, Llama
from model.attention import attention


def tiny_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(Config.from_name("tiny", **overrides), kernels="torch")


def test_tinyllama_parameter_count_on_meta():
    config = Config.from_name("tinyllama-1.1b")
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384
    assert config.num_params == 1_100_048_384
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (22, 2048, 32, 4)
    assert (config.intermediate_size, config.vocab_size, config.block_size) == (5632, 32000, 2048)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tiny_config_is_small_and_presets_build():
    assert Config.from_name("tiny").num_params < 1_000_000
    for name in ("nano", "micro", "small"):
        with torch.device("meta"):
            model = Llama(Config.from_name(name))
        assert model.num_params() == Config.from_name(name).num_params


def test_unknown_config_lists_valid_names():
    with pytest.raises(ValueError, match="tinyllama-1.1b") as err:
        Config.from_name("llama-9000")
    assert "tiny" in str(err.value)
    with pytest.raises(ValueError, match="n_head"):
        Config.from_name("tiny", n_head=3)
    with pytest.raises(ValueError, match="unknown Config field"):
        Config.from_name("tiny", n_heads=4)


def test_flops_per_token_formula():
    c = Config.from_name("tinyllama-1.1b")
    n_non_embed = c.num_params - c.vocab_size * c.n_embd
    assert c.flops_per_token(2048) == 6 * n_non_embed + 12 * 22 * 2048 * 2048


def test_causality():
    model = tiny_model()
    x = torch.randint(0, 512, (2, 24))
    t = 13
    y = x.clone()
    y[:, t] = (y[:, t] + 7) % 512
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4


def naive_attention(q, k, v):
    """Repeat K/V for each query group, explicit causal mask, softmax: (B, T, H, D) layout."""
    B, T, Hq, D = q.shape
    rep = Hq // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def test_sdpa_gqa_matches_naive_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 19, 8, 16)
    k, v = torch.randn(2, 19, 2, 16), torch.randn(2, 19, 2, 16)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_matches_full_forward():
    model = tiny_model()
    x = torch.randint(0, 512, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.make_kv_cache(batch_size=3, max_len=32)
        prefill = model(x[:, :8], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(8, 20)]
    decoded = torch.cat([prefill] + steps, dim=1)
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_left_padding_matches_unpadded_rows():
    model = tiny_model()
    lengths = [5, 9]
    rows = [torch.randint(3, 512, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    nxt = torch.randint(3, 512, (2, 1))
    with torch.no_grad():
        cache = model.make_kv_cache(2, 16)
        out = model(ids, cache=cache, positions=positions, attention_mask=mask)
        step = model(nxt, cache=cache, positions=positions[:, -1:] + 1)
        for i, r in enumerate(rows):
            ref = model(torch.cat([r, nxt[i]])[None])
            torch.testing.assert_close(out[i, -1], ref[0, len(r) - 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[i, 0], ref[0, -1], rtol=1e-5, atol=1e-5)


def test_loss_matches_cross_entropy_of_logits():
    model = tiny_model()
    x = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    targets[0, :5] = -100
    with torch.no_grad():
        logits = model(x)
        loss = model(x, targets=targets)
    expected = F.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [None, 3])
def test_init_scales(seed):
    """Every weight matrix has the std the docs give, written out here for the tiny config at
    4 layers (d=64): sqrt(2 / (5·64)) = 0.0790569 for embed, qkv, gate_up and lm_head, and
    GPT-NeoX's 2 / (4·sqrt(64)) = 0.0625 for the two residual-stream writers (attn.proj and
    mlp.down); norms are ones. Each matrix has >= 4096 entries, so its sample std is within ~1.1%
    (one sigma) of the truth and a 4% tolerance still catches a std off by 5% or more."""
    model = tiny_model(n_layer=4)
    if seed is not None:
        model.init_weights(seed=seed)
    small, residual = 0.0790569, 0.0625
    seen = set()
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name
            continue
        expected = residual if name.endswith(("attn.proj.weight", "mlp.down.weight")) else small
        assert abs(p.std().item() - expected) < 0.04 * expected, (name, p.std().item(), expected)
        assert abs(p.mean().item()) < 4 * expected / p.numel() ** 0.5, name
        seen.add(name.split(".")[-2] if "layers." in name else name)
    assert seen == {"embed.weight", "qkv", "proj", "gate_up", "down", "lm_head.weight"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    model = tiny_model().to(dtype)
    model.save(tmp_path / "ckpt")
    loaded = Llama.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype == dtype, name
        assert torch.equal(a, b), name
    x = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.load(tmp_path)
    tiny_model().save(tmp_path / "a")
    bad = Config.from_name("tiny", n_layer=3)
    bad.save(tmp_path / "a" / "config.json")
    with pytest.raises(ValueError, match="layers.2"):
        Llama.load(tmp_path / "a")


def test_context_overflow_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_kernels_are_resolved_once_not_per_layer_or_forward(monkeypatch):
    import kernels

    resolved = []
    original = kernels.resolve_backend
    monkeypatch.setattr(kernels, "resolve_backend", lambda *a: (resolved.append(a), original(*a))[1])
    model = Llama(Config.from_name("tiny", block_size=16), kernels="torch")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model(ids)
    model(ids, targets=ids)
    assert len(resolved) == 1 and model.config.n_layer > 1
    with pytest.raises(ValueError, match="kernels must be one of"):
        Llama(Config.from_name("tiny"), kernels="cuda")  # refused when built, not at the first forward


def test_the_attention_modules_do_not_import_each_other():
    import subprocess
    import sys

    code = ("import sys, model.document_mask, model.flash_attn; "
            "assert 'model.attention' not in sys.modules and 'model.llama' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
