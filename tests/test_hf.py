"""HF interoperability: export -> transformers loads the same logits; an HF random Llama
imports to the same logits; tokenizer files load; bad directories are clear errors."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import require_module

transformers = require_module("transformers")  # the test extra installs it

from model import Config, Llama  # noqa: E402
from model.hf import load_hf  # noqa: E402

REPO_SCRIPTS = "scripts/convert_hf.py"


def run_convert(*args, cwd):
    return subprocess.run([sys.executable, REPO_SCRIPTS, *map(str, args)], cwd=cwd, capture_output=True, text=True)


@pytest.fixture()
def repo_root(request):
    return request.config.rootpath


def test_export_matches_transformers_logits(tmp_path, repo_root, tiny_tokenizer):
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny", rope_base=500.0, norm_eps=1e-6), kernels="torch")
    model.save(tmp_path / "ckpt")
    result = run_convert("export", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "hf",
                         "--tokenizer", tiny_tokenizer, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    text = "def f(x): return the model"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.eos_token_id == sp.eos_id()


def test_import_random_hf_llama_matches_logits(tmp_path, repo_root):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    result = run_convert("import", "--hf", tmp_path / "hf", "--out", tmp_path / "ours", cwd=repo_root)
    assert result.returncode == 0, result.stderr
    ours = Llama.load(tmp_path / "ours", kernels="torch")
    assert (ours.config.n_kv_head, ours.config.norm_eps, ours.config.rope_base) == (2, 1e-6, 500.0)
    x = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_tied_hf_checkpoint_imports_untied(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", kernels="torch")
    assert torch.equal(ours.lm_head.weight, ours.embed.weight)
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_round_trip_export_import_is_exact(tmp_path, repo_root):
    model = Llama(Config.from_name("tiny"), kernels="torch").to(torch.bfloat16)
    model.save(tmp_path / "a")
    assert run_convert("export", "--ckpt", tmp_path / "a", "--out", tmp_path / "hf", cwd=repo_root).returncode == 0
    assert run_convert("import", "--hf", tmp_path / "hf", "--out", tmp_path / "b", cwd=repo_root).returncode == 0
    back = Llama.load(tmp_path / "b")
    for key, value in model.state_dict().items():
        assert back.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[key], value), key


def test_non_llama_directory_is_a_clear_error(tmp_path, repo_root):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    result = run_convert("import", "--hf", tmp_path / "gpt2", "--out", tmp_path / "x", cwd=repo_root)
    assert result.returncode != 0
    assert "not a Llama model" in result.stderr and "gpt2" in result.stderr
    result = run_convert("import", "--hf", tmp_path / "missing", "--out", tmp_path / "x", cwd=repo_root)
    assert result.returncode != 0 and "config.json" in result.stderr


def test_mismatched_hf_weights_name_the_tensor(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["num_hidden_layers"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="model.layers.1"):
        load_hf(tmp_path / "hf")
