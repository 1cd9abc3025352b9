"""Bad checkpoints through every command that takes one, in-process through main(argv).

Each bad input (a GGUF file, another file, an unsupported architecture, an unsupported RoPE
type, a tokenizer with more ids than the embedding has rows, a chat template with no generation
prompt) against each command (convert_hf import and export, generate, chat, SFT, SPIN,
pretraining's --init-from): exit 2, the message names the file and the field, no traceback, and
the output directory does not exist afterwards, and no process group was started (Fabric's
launch sets MASTER_PORT). Cells where the input is fine for that command
are listed in ACCEPTED with the reason (generate continues raw text; pretraining uses no chat
template). Pretraining's own refusals (shards of another tokenizer, shape flags):
tests/test_pretrain_init_from.py."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys

import pytest
from conftest import load_script
from test_chat_templates import SMOLLM2_TEMPLATE, hf_model_dir
from test_hf_architectures import edited_copy


@pytest.fixture(scope="module")
def bad(tiny_hf_models, hf_tokenizers, tiny_tokenizer, tmp_path_factory):
    """name -> (path, the message naming its file and field)."""
    root = tmp_path_factory.mktemp("bad")
    gguf = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    other = root / "model.safetensors"
    other.write_bytes(bytes(64))
    yarn = edited_copy(tiny_hf_models["linear-rope"], root / "yarn", rope_scaling=None,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    qwen = edited_copy(tiny_hf_models["linear-rope"], root / "qwen", architectures=["Qwen2ForCausalLM"],
                       model_type="qwen2")
    for directory in (yarn, qwen):  # a tokenizer, so that only the config is wrong
        shutil.copyfile(tiny_tokenizer, directory / "tokenizer.model")
    big = hf_model_dir(root / "big", hf_tokenizers["chatml"], vocab_size=512)  # 600 ids
    no_prompt = hf_model_dir(root / "no-prompt", hf_tokenizers["chatml"])
    (no_prompt / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE[:SMOLLM2_TEMPLATE.index(
        "{% if add_generation_prompt %}")])
    return {
        "gguf": (gguf, f"{gguf}: a GGUF file (llama.cpp's format), not a model directory"),
        "other file": (other, f"{other}: a file, not a model directory"),
        "architecture": (qwen, f"{qwen / 'config.json'}: architectures ['Qwen2ForCausalLM']"),
        "rope type": (yarn, f"{yarn / 'config.json'}: unsupported Llama variant: RoPE scaling "
                            f"rope_parameters.rope_type='yarn'"),
        "tokenizer larger than the embedding": (big, f"tokenizer {big / 'tokenizer.json'} has 600 tokens but the "
                                                     f"model's vocab_size is 512"),
        "template without generation prompt": (no_prompt, f"{no_prompt / 'chat_template.jinja'}: the chat template "
                                                          f"has no generation prompt"),
    }


def commands(tmp_path):
    """name -> a function (checkpoint, out) -> exit status."""
    from finetune import sft, spin
    from pretrain import tinyllama

    convert, generate, chat = load_script("convert_hf"), load_script("generate"), load_script("chat")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    shards = tmp_path / "shards"  # never read: the checkpoint is refused first
    return {
        "import": lambda ckpt, out: convert.main(["import", "--hf", str(ckpt), "--out", str(out)]),
        "export": lambda ckpt, out: convert.main(["export", "--ckpt", str(ckpt), "--out", str(out)]),
        "generate": lambda ckpt, out: generate.main(["--ckpt", str(ckpt), "--prompt", "hi", "--device", "cpu"]),
        "chat": lambda ckpt, out: chat.main(["--ckpt", str(ckpt), "--device", "cpu"]),
        "sft": lambda ckpt, out: sft.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]),
        "spin": lambda ckpt, out: spin.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]),
        "pretrain": lambda ckpt, out: tinyllama.main(["--init-from", str(ckpt), "--data", f"{shards}:1", "--out",
                                                      str(out), "--wandb-mode", "disabled"]),
    }


ACCEPTED = {
    ("generate", "template without generation prompt"),  # it continues raw text, no template
    ("pretrain", "template without generation prompt"),  # pretraining renders no chat
}


def test_every_command_refuses_every_bad_checkpoint(bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # chat would read its first turn
    refused = 0
    for command, main in commands(tmp_path).items():
        for case, (ckpt, message) in bad.items():
            if (command, case) in ACCEPTED:
                continue
            out = tmp_path / f"out-{command}-{case.replace(' ', '-')}"
            monkeypatch.delenv("MASTER_PORT", raising=False)
            status = main(ckpt, out)
            err = capsys.readouterr().err
            assert status == 2 and message in err, (command, case, status, err)
            assert "Traceback" not in err and not out.exists(), (command, case, err)
            assert "MASTER_PORT" not in os.environ, (command, case)  # refused before setting up processes
            assert case != "gguf" or "gguf_file=" in err  # and how to convert it
            refused += 1
    assert refused == 7 * 6 - len(ACCEPTED)
