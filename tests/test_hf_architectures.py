"""The HF checkpoints people have, against transformers on tiny random models (tests/conftest.py
`tiny_hf_models`): a Llama-3.2-style one (tied, rope_type llama3, explicit head_dim, GQA), a
linear-RoPE Llama and two Mistrals (no window; a window shorter than the sequence). For each:
import gives transformers' logits (fp32, <= 1e-5) and our KV-cache greedy decoding equals HF
`generate`; export loads back in transformers as the same class, tied as it was, with the same
logits. Both config spellings of RoPE are read; counts are right for tied models and explicit
head_dim; every unsupported variant is refused by import with exit 2, naming the file and field,
with nothing written (every command against every bad checkpoint: tests/test_bad_checkpoints.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_HF_MODELS, load_script, require_module

from finetune.generate import generate_batch
from model import Config, Llama
from model.document_mask import Documents
from model.hf import config_from_hf, load_hf, save_hf

transformers = require_module("transformers")

KINDS = sorted(TINY_HF_MODELS)
SEQ = 40  # longer than mistral-window's window (6)


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def tokens(batch=2, length=SEQ, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def convert_hf():
    return load_script("convert_hf")


# ---- import ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_import_gives_transformers_logits(tiny_hf_models, kind):
    ours = load_hf(tiny_hf_models[kind], kernels="torch")
    theirs = hf_model(tiny_hf_models[kind])
    x = tokens()
    assert max_diff(ours(x), theirs(x).logits) <= 1e-5
    # every sequence is also one document: the document-mask path (with its own window) agrees too
    assert max_diff(ours(x, documents=Documents(x, 10_000, "sdpa-mask", window=ours.config.sliding_window)), theirs(x).logits) <= 1e-5


def test_import_reads_what_each_checkpoint_declares(tiny_hf_models):
    def config(kind):
        return load_hf(tiny_hf_models[kind], kernels="torch").config

    llama3 = config("llama3")
    assert (llama3.architecture, llama3.tie_embeddings, llama3.head_dim, llama3.n_kv_head) == \
        ("LlamaForCausalLM", True, 16, 2)
    assert (llama3.rope_type, llama3.rope_base, llama3.rope_factor, llama3.rope_low_freq_factor,
            llama3.rope_high_freq_factor, llama3.rope_original_context) == ("llama3", 500000.0, 8.0, 1.0, 4.0, 48)
    assert (config("linear-rope").rope_type, config("linear-rope").rope_factor) == ("linear", 4.0)
    assert (config("mistral").architecture, config("mistral").sliding_window) == ("MistralForCausalLM", None)
    assert config("mistral-window").sliding_window == 6


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_greedy_decoding_equals_hf_generate(tiny_hf_models, kind):
    ours = load_hf(tiny_hf_models[kind], kernels="torch").eval()
    theirs = hf_model(tiny_hf_models[kind])
    theirs.generation_config.eos_token_id = None  # decode the full length on both sides
    x = tokens(seed=1)
    prompts = [x[0, :12].tolist(), x[1, :5].tolist()]  # batched, the shorter one left-padded
    new = 20  # decoding runs well past the window of mistral-window
    got = generate_batch(ours, prompts, new, eos_id=-1, pad_id=0)
    for prompt, row in zip(prompts, got):
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert row == want


def test_the_tie_is_one_parameter_after_import(tiny_hf_models):
    model = load_hf(tiny_hf_models["llama3"], kernels="torch")
    assert model.lm_head.weight is model.embed.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert model.num_params() == model.config.num_params == hf_model(tiny_hf_models["llama3"]).num_parameters()


@torch.no_grad()
def test_a_tied_checkpoint_that_also_stores_lm_head(tiny_hf_models, tmp_path, convert_hf, capsys):
    """The same values: one tied matrix. Different ones: transformers 4 tied them (using the
    embedding), 5 unties them, so which model is meant is unclear: refused, naming the field."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "both"
    shutil.copytree(tiny_hf_models["llama3"], directory)
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    ours = load_hf(directory, kernels="torch")
    assert ours.lm_head.weight is ours.embed.weight
    assert max_diff(ours(tokens()), hf_model(directory)(tokens()).logits) <= 1e-5

    weights["lm_head.weight"] += 1
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    assert convert_hf.main(["import", "--hf", str(directory), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{directory / 'config.json'}: tie_word_embeddings is true but" in err, err
    assert not (tmp_path / "out").exists()


# ---- both spellings of RoPE in config.json -----------------------------------------------------
@pytest.mark.parametrize("kind", ["llama3", "linear-rope"])
def test_transformers_4_rope_scaling_spelling_reads_the_same(tiny_hf_models, tmp_path, kind):
    """transformers 4 wrote rope_theta + rope_scaling; 5 writes rope_parameters: the same model."""
    directory = tmp_path / kind
    shutil.copytree(tiny_hf_models[kind], directory)
    data = json.loads((directory / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = rope
    (directory / "config.json").write_text(json.dumps(data))
    assert config_from_hf(data) == load_hf(tiny_hf_models[kind]).config
    with torch.no_grad():
        assert max_diff(load_hf(directory, kernels="torch")(tokens()), hf_model(tiny_hf_models[kind])(tokens()).logits) <= 1e-5


# ---- export -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_import_then_export_loads_in_transformers_as_it_came(tiny_hf_models, tmp_path, kind, convert_hf):
    source = tiny_hf_models[kind]
    assert convert_hf.main(["import", "--hf", str(source), "--out", str(tmp_path / "ours")]) == 0
    saved = Llama.load(tmp_path / "ours", kernels="torch")
    assert saved.config == load_hf(source).config  # what it declared, kept in our config.json
    assert convert_hf.main(["export", "--ckpt", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    original, back = hf_model(source), hf_model(tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert type(back) is type(original)
    assert exported["architectures"] == [TINY_HF_MODELS[kind][0]]
    assert back.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == original.config.tie_word_embeddings
    if original.config.tie_word_embeddings:  # one tensor on disk, as transformers writes a tied model
        from safetensors import safe_open

        with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()
    assert getattr(back.config, "sliding_window", None) == getattr(original.config, "sliding_window", None)
    assert back.config.head_dim == original.config.head_dim
    x = tokens(seed=2)
    assert max_diff(back(x).logits, original(x).logits) <= 1e-5
    assert max_diff(saved(x), original(x).logits) <= 1e-5


# ---- counts -----------------------------------------------------------------------------------
def test_counts_of_tied_and_explicit_head_dim_configs():
    base = dict(vocab_size=512, n_layer=2, n_embd=48, n_head=4, n_kv_head=2, intermediate_size=96, block_size=64)
    for fields in ({}, {"tie_embeddings": True}, {"head_dim": 16}, {"tie_embeddings": True, "head_dim": 16}):
        config = Config(**base, **fields)
        with torch.device("meta"):
            model = Llama(config)
        assert config.num_params == sum(p.numel() for p in model.parameters()), fields
        # 6 x (every matmul's weights: the blocks, and lm_head, which a tied model runs with the embedding)
        matmuls = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight")
        matmuls += 0 if "lm_head.weight" in dict(model.named_parameters()) else config.vocab_size * config.n_embd
        norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
        attention = 12 * config.n_layer * config.n_head * config.head_dim * 64
        assert config.flops_per_token(64) == 6 * (matmuls + norms) + attention, fields


def test_presets_and_configs_saved_before_the_new_fields_are_unchanged(tmp_path):
    old_tiny = {"name": "tiny", "vocab_size": 512, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2,
                "intermediate_size": 176, "block_size": 128, "norm_eps": 1e-5, "rope_base": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(old_tiny))
    loaded = Config.load(tmp_path / "config.json")
    assert loaded == Config.from_name("tiny")
    assert (loaded.head_dim, loaded.tie_embeddings, loaded.rope_type, loaded.sliding_window, loaded.architecture) == \
        (16, False, "default", None, "LlamaForCausalLM")
    assert Config.from_name("tinyllama-1.1b").num_params == 1_100_048_384
    # a preset's head_dim is derived, so overriding the width derives it again
    assert Config.from_name("tiny", n_embd=128).head_dim == 32


# ---- refusals ---------------------------------------------------------------------------------
def edited_copy(source, tmp_path, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(source, directory)
    data = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (directory / "config.json").write_text(json.dumps(data))
    return directory


REFUSED = {
    "architecture": (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"), "'architectures'"),
    "attention bias": (dict(attention_bias=True), "attention_bias=true"),
    "mlp bias": (dict(mlp_bias=True), "mlp_bias=true"),
    "hidden_act": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "rope dynamic": (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                     "rope_parameters.rope_type='dynamic'"),
    "rope yarn (transformers 4)": (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}),
                                   "rope_scaling.rope_type='yarn'"),
    "llama3 without its factors": (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
                                   "needs 'low_freq_factor'"),
    "partial rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_variants_are_refused_naming_the_file_and_field(tiny_hf_models, tmp_path, case, convert_hf,
                                                                     capsys):
    changes, field = REFUSED[case]
    directory = edited_copy(tiny_hf_models["linear-rope"], tmp_path, **changes)
    out = tmp_path / "out"
    assert convert_hf.main(["import", "--hf", str(directory), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{directory / 'config.json'}:" in err and field in err, err
    assert not out.exists()


# ---- import -> SFT -> SPIN -> export ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3", "mistral-window"])
def test_sft_and_spin_keep_the_architecture_through_to_export(tiny_hf_models, tiny_tokenizer, tmp_path, kind,
                                                             convert_hf):
    from test_spin_e2e import run_cli

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"add {i} {i + 1}", "messages": [
        {"role": "user", "content": f"add {i} {i + 1}"},
        {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}"}]}) + "\n" for i in range(16)))
    start = tmp_path / "hf"
    shutil.copytree(tiny_hf_models[kind], start)
    shutil.copyfile(tiny_tokenizer, start / "tokenizer.model")
    r = run_cli("sft.py", "--ckpt", start, "--data", chat, "--out", tmp_path / "sft", "--max-steps", 2,
                "--global-batch-size", 4, "--micro-batch-size", 4, "--lr", 1e-3)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("spin.py", "--ckpt", tmp_path / "sft" / "final", "--data", chat, "--out", tmp_path / "spin",
                "--iterations", 1, "--num-prompts", 8, "--max-new-tokens", 4, "--max-prompt-len", 24,
                "--max-len", 48, "--gen-batch-size", 8, "--global-batch-size", 8, "--micro-batch-size", 4,
                "--epochs", 1, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "spin" / "iter1"
    ours = Llama.load(final, kernels="torch")
    assert ours.config == Llama.load(tmp_path / "sft" / "final").config == load_hf(start).config
    assert convert_hf.main(["export", "--ckpt", str(final), "--out", str(tmp_path / "export")]) == 0
    original, back = hf_model(start), hf_model(tmp_path / "export")
    assert type(back) is type(original)
    assert back.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert getattr(back.config, "sliding_window", None) == getattr(original.config, "sliding_window", None)
    x = tokens(seed=3)
    with torch.no_grad():
        assert max_diff(back(x).logits, ours(x)) <= 1e-5
        assert max_diff(back(x).logits, original(x).logits) > 1e-4  # training changed the weights
