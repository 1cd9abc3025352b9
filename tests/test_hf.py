"""HF interoperability: export -> transformers loads the same logits; an HF random Llama
imports to the same logits from each layout real checkpoints use (model.safetensors, sharded
safetensors with an index, pytorch_model.bin with and without an index); tokenizer files
load; bad directories, missing shards and unsupported RoPE scaling are clear errors (exit 2).
Tied, llama3/linear RoPE, explicit head_dim and Mistral: tests/test_hf_architectures.py."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import load_script, require_module, run_main

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


@pytest.mark.slow
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
    convert_hf = load_script("convert_hf").main
    result = run_main(convert_hf, "import", "--hf", tmp_path / "gpt2", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert "not a Llama model" in result.stderr and "gpt2" in result.stderr
    result = run_main(convert_hf, "import", "--hf", tmp_path / "missing", "--out", tmp_path / "x")
    assert result.returncode == 2 and f"{tmp_path / 'missing'}: no such model directory" in result.stderr


def test_mismatched_hf_weights_name_the_tensor(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["num_hidden_layers"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="model.layers.1"):
        load_hf(tmp_path / "hf")


# ---- the on-disk layouts real checkpoints use ------------------------------------------------
def _small_hf_llama(seed=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   rope_theta=500.0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _write_bin_shards(hf, directory, n_shards):
    """The layout transformers 4 wrote with safe_serialization=False (e.g. Llama-2-7b-hf):
    pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin files and pytorch_model.bin.index.json."""
    hf.config.save_pretrained(directory)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if n_shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in names[i::n_shards]}
        torch.save(part, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["sharded safetensors", "pytorch_model.bin", "sharded pytorch_model.bin"])
def test_import_of_each_checkpoint_layout_matches_logits(tmp_path, layout):
    hf = _small_hf_llama()
    directory = tmp_path / "hf"
    if layout == "sharded safetensors":
        hf.save_pretrained(directory, max_shard_size="20KB")  # what transformers writes for big models
        shards = list(directory.glob("model-*-of-*.safetensors"))
        assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    else:
        directory.mkdir()
        _write_bin_shards(hf, directory, n_shards=1 if layout == "pytorch_model.bin" else 3)
        shards = list(directory.glob("pytorch_model*.bin"))
        assert not list(directory.glob("*.safetensors"))
    assert len(shards) >= (1 if layout == "pytorch_model.bin" else 3)
    ours = load_hf(directory, kernels="torch")
    x = torch.randint(0, 160, (2, 17))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    # The on-demand reader of the sharded load (pretrain/sharded_load.py) gives the same tensors.
    from model.hf import HFTensors, tensor_from_hf

    lazy = HFTensors(directory)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor_from_hf(name, lazy), tensor), name


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_index_naming_a_missing_shard_is_a_clear_error(tmp_path, index_name):
    hf = _small_hf_llama()
    directory = tmp_path / "hf"
    if index_name.startswith("model."):
        hf.save_pretrained(directory, max_shard_size="20KB")
        gone = sorted(directory.glob("model-*.safetensors"))[1]
    else:
        directory.mkdir()
        _write_bin_shards(hf, directory, n_shards=3)
        gone = sorted(directory.glob("pytorch_model-*.bin"))[1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"{index_name} lists {gone.name}, which is not in"):
        load_hf(directory)


ROPE_SCALING = {
    # transformers 4 configs (rope_scaling, old "type" key) and 5 (rope_parameters); default, linear
    # and llama3 are supported (tests/test_hf_architectures.py), these are not
    "dynamic rope_scaling": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "yarn, old key": {"rope_scaling": {"type": "yarn", "factor": 2.0}},
    "dynamic rope_parameters": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
}


@pytest.mark.parametrize("case", sorted(ROPE_SCALING))
def test_rope_scaling_is_refused_with_a_clear_message(tmp_path, repo_root, case):
    _small_hf_llama().save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("rope_scaling", None)
    config.pop("rope_parameters", None)
    config.update(ROPE_SCALING[case])
    config_path.write_text(json.dumps(config))
    result = run_main(load_script("convert_hf").main, "import", "--hf", tmp_path / "hf", "--out", tmp_path / "ours")
    assert result.returncode == 2, result.stderr
    field, kind = next(iter(ROPE_SCALING[case].items()))
    assert f"{config_path}: unsupported Llama variant: RoPE scaling {field}.rope_type=" \
           f"{kind.get('rope_type', kind.get('type'))!r} (supported: default, linear, llama3)" in result.stderr
    assert not (tmp_path / "ours").exists()


def test_rope_scaling_written_by_transformers_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"RoPE scaling .*'dynamic' \(supported: default, linear, llama3\)"):
        load_hf(tmp_path / "hf")
