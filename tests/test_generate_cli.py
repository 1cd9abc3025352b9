"""scripts/generate.py: greedy completion equals transformers' greedy generation on the
exported model, from every checkpoint format; sampling follows the seed; a missing or
mismatched tokenizer is a clear error with exit code 2."""
import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import load_script, require_module, run_main
from finetune.generate import generate_batch
from finetune.inference import TextStream
from data_prep.tokenizer import Tokenizer

SCRIPT = "scripts/generate.py"
PROMPT = "print the loss"  # the tiny model continues it with "▁to": the space must survive streaming


def run_generate(root, *args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=root, capture_output=True, text=True,
                          timeout=300)


def refused(*args):
    """scripts/generate.py's main(argv) in this process, for the runs that must exit 2."""
    return run_main(load_script("generate").main, *args)


def ids_after(label: str, stderr: str) -> list[int]:
    match = re.search(rf"{label} \(\d+[^)]*\): (\[[^\]]*\])", stderr)
    assert match, stderr
    return json.loads(match.group(1))


def write_training_checkpoint(consolidated, step_dir):
    """A pretraining checkpoint as pretrain/checkpoint.py lays it out (DCP state, config, tokenizer,
    COMPLETE marker), holding only the model weights, which is all that generation reads."""
    import torch.distributed.checkpoint as dcp

    from model import Llama

    model = Llama.load(consolidated, kernels="torch")
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir / "state"), no_dist=True)
    model.config.save(step_dir / "config.json")
    shutil.copyfile(consolidated / "tokenizer.model", step_dir / "tokenizer.model")
    (step_dir / "COMPLETE").write_text("")


@pytest.mark.parametrize("fmt", ["sft", "hf", "pretrain_final", "pretrain_step", "pretrain_out"])
def test_greedy_matches_transformers(fmt, tiny_checkpoints, tiny_tokenizer, tmp_path, request):
    transformers = require_module("transformers")
    ckpt = tiny_checkpoints.get(fmt)
    if fmt == "pretrain_final":  # a pretraining --out directory: the weights and tokenizer are in final/
        shutil.copytree(tiny_checkpoints["base"], tmp_path / "run" / "final")
        ckpt = tmp_path / "run"
    if fmt in ("pretrain_step", "pretrain_out"):  # a training checkpoint, or an --out dir holding only those
        write_training_checkpoint(tiny_checkpoints["base"], tmp_path / "run" / "checkpoints" / "step-000010")
        ckpt = tmp_path / "run" / "checkpoints" / "step-000010" if fmt == "pretrain_step" else tmp_path / "run"
    result = run_generate(request.config.rootpath, "--ckpt", ckpt, "--prompt", PROMPT, "--temperature", 0,
                          "--max-new-tokens", 24, "--verbose")
    assert result.returncode == 0, result.stderr

    hf_dir = tiny_checkpoints["hf"]
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt_ids = hf_tok(PROMPT)["input_ids"]
    assert ids_after("prompt ids", result.stderr) == prompt_ids  # BOS + text, as HF encodes it
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)[0, len(prompt_ids):]
    expected = [i for i in out.tolist() if i != hf.generation_config.eos_token_id]
    assert ids_after("generated ids", result.stderr) == expected
    sp = Tokenizer(tiny_tokenizer)
    assert result.stdout == sp.decode(prompt_ids + expected) + "\n"


@pytest.mark.slow
def test_sampling_follows_the_seed(tiny_checkpoints, request):
    runs = [run_generate(request.config.rootpath, "--ckpt", tiny_checkpoints["sft"], "--prompt", PROMPT,
                         "--temperature", 1.0, "--top-p", 0.9, "--seed", seed, "--max-new-tokens", 16)
            for seed in (1, 1, 2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout


def test_missing_tokenizer_is_exit_2(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["base"], tmp_path / "ckpt", ignore=shutil.ignore_patterns("tokenizer.model"))
    result = refused("--ckpt", tmp_path / "ckpt", "--prompt", "x")
    assert result.returncode == 2
    assert "tokenizer.model does not exist" in result.stderr and "--tokenizer" in result.stderr
    assert "Traceback" not in result.stderr


def test_mismatched_tokenizer_is_exit_2(tiny_tokenizer, tmp_path):
    from model import Config, Llama

    Llama(Config.from_name("tiny", vocab_size=256), kernels="torch").save(tmp_path / "small_vocab")
    result = refused("--ckpt", tmp_path / "small_vocab", "--tokenizer",
                          tiny_tokenizer, "--prompt", "x")
    assert result.returncode == 2
    assert "has 512 pieces but the model's vocab_size is 256" in result.stderr
    assert "Traceback" not in result.stderr


def test_hf_config_with_other_special_ids_is_exit_2(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["hf"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    result = refused("--ckpt", tmp_path / "hf", "--prompt", "x")
    assert result.returncode == 2
    assert "eos_token_id is 7 but tokenizer" in result.stderr


def test_prompt_longer_than_context_is_exit_2(tiny_checkpoints):
    result = refused("--ckpt", tiny_checkpoints["sft"],
                          "--prompt", "the model " * 200)
    assert result.returncode == 2 and "context is 128" in result.stderr


def test_text_stream_pieces_add_up_to_the_decoded_text(tiny_tokenizer):
    """Streaming prints exactly the decoded text, even when characters span byte pieces."""
    tok = Tokenizer(tiny_tokenizer)
    context = [tok.bos_id] + tok.encode("Prompt:")
    answer = tok.encode("the model Ω€😀 naïve")  # "Ω€😀" are byte pieces in the tiny tokenizer
    stream = TextStream(tok, context)
    pieces = [stream.push(i) for i in answer] + [stream.flush()]
    assert "".join(pieces) == tok.decode(context + answer)[len(tok.decode(context)):] == " the model Ω€😀 naïve"
    assert "\ufffd" not in "".join(pieces)
    assert any(p == "" for p in pieces)  # a multi-byte character was held back until complete


def test_on_token_sees_every_step_and_can_stop_decoding():
    from model import Config, Llama

    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny"), kernels="torch").eval()
    seen = []
    full = generate_batch(model, [[5, 6, 7]], 10, eos_id=-1, pad_id=0, on_token=lambda t: seen.append(t.tolist()))
    assert [s[0] for s in seen] == full[0]

    def stop_after_three(t):
        if len(seen) == 13:
            raise KeyboardInterrupt
        seen.append(t.tolist())

    with pytest.raises(KeyboardInterrupt):
        generate_batch(model, [[5, 6, 7]], 10, eos_id=-1, pad_id=0, on_token=stop_after_three)
    assert [s[0] for s in seen[10:]] == full[0][:3]
