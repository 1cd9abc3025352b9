"""Continued pretraining, `pretrain/tinyllama.py --init-from CKPT` (pretrain/init_from.py).

The weights really are CKPT's: the first step's loss (before any update) equals transformers'
loss of CKPT on that step's batch, on SmolLM2-135M-Instruct with shards data_prep made from its
tokenizer.json, and on a tiny tied HF model over 2 FSDP2 processes. A rerun that resumes reads
its checkpoint, not CKPT, and continues as the uninterrupted run did. Shards of another
tokenizer, shape flags that contradict CKPT and a missing CKPT exit 2 naming the file and
field, before anything is written (bad checkpoints: tests/test_bad_checkpoints.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import require_module

from data_prep.tokenizer import Tokenizer
from model import Config, Llama
from pretrain import init_from, tinyllama
from pretrain.checkpoint import load_model_from_any
from pretrain.data import MixtureSampler, SourceSpec
from test_data_prep import tokenize, write_slimpajama
from test_pretrain_run import learnable_corpus, losses, run
from test_sharding import on

BLOCK = 32


def args_for(ckpt, data, out, *extra, steps=2) -> list[str]:
    return ["--init-from", str(ckpt), "--data", f"{data}:1", "--out", str(out), "--max-steps", str(steps),
            "--global-batch-size", "2", "--micro-batch-size", "1", "--block-size", str(BLOCK), "--lr", "1e-3",
            "--warmup-steps", "0", "--log-every", "1", "--save-every", "100", "--num-workers", "0",
            "--precision", "32-true", "--wandb-mode", "disabled", *extra]


def hf_first_step_loss(transformers, hf_dir, data, vocab_size, seed=42) -> float:
    """transformers' mean loss of `hf_dir` over the first global batch (samples 0 and 1), the
    step loss pretraining logs before its first update (equal-length windows: mean of means)."""
    x, y = MixtureSampler([SourceSpec(data, 1.0)], BLOCK, seed, vocab_size).batch(range(2))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


# ---- real weights -----------------------------------------------------------------------------
@pytest.mark.slow
def test_init_from_smollm2_starts_from_its_weights(smollm2_hf, tmp_path):
    transformers = require_module("transformers")
    corpus = tmp_path / "corpus"
    write_slimpajama(corpus)
    data = tmp_path / "shards"
    # SmolLM2's pretraining separated documents with <|endoftext|>, not its chat EOS <|im_end|>
    summary = tokenize("slimpajama", corpus, data, smollm2_hf, workers=1, eos_token="<|endoftext|>")
    assert summary["tokenizer"]["kind"] == "tokenizer.json" and summary["settings"]["eos_id"] == 0
    out = tmp_path / "out"
    # one step, nothing saved: 135M parameters with their AdamW state would be 2 GB on disk
    proc = run(args_for(smollm2_hf, data, out, "--no-save", steps=1), tmp_path)
    assert f"--init-from {smollm2_hf}: weights of {smollm2_hf} loaded" in proc.stdout
    assert "model hf-import: 134,515,008 parameters, context 8192" in proc.stdout  # tied: one embedding
    expected = hf_first_step_loss(transformers, smollm2_hf, data, 49152)
    # measured: 6.613245 vs 6.613238 (7e-6); a model that is not SmolLM2 is off by nats (ln 49152 = 10.8)
    assert abs(losses(out)[1] - expected) < 1e-4, (losses(out), expected)
    assert expected < 8  # word salad, yet far better than chance: these are SmolLM2's weights


# ---- a tiny HF model on 2 processes; resume wins over --init-from ------------------------------
@pytest.fixture(scope="module")
def tiny_hf_with_tokenizer(tiny_hf_models, tiny_tokenizer, tmp_path_factory):
    """conftest's tiny Llama-3-style model (tied, llama3 RoPE, head_dim 16), with the tiny tokenizer."""
    directory = tmp_path_factory.mktemp("init") / "llama3"
    shutil.copytree(tiny_hf_models["llama3"], directory)
    shutil.copyfile(tiny_tokenizer, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    return learnable_corpus(tmp_path_factory.mktemp("counting") / "a", 0, n_tokens=4000)


@pytest.fixture(scope="module")
def two_process_run(tiny_hf_with_tokenizer, counting, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "out"
    proc = run(args_for(tiny_hf_with_tokenizer, counting, out), out.parent, launcher=on(2))
    return out, proc


@pytest.mark.slow
def test_init_from_an_hf_model_on_two_processes(two_process_run, tiny_hf_with_tokenizer, counting):
    transformers = require_module("transformers")
    out, proc = two_process_run
    assert "loaded into the shards" in proc.stdout and "shard 2) over 2 rank(s)" in proc.stdout
    # learnable_corpus writes no summary.json: only the headers' vocab_size could be checked, and the log says so
    assert f"tokenizer of the shards: not recorded in {counting}" in proc.stdout
    expected = hf_first_step_loss(transformers, tiny_hf_with_tokenizer, counting, 512)
    assert abs(losses(out)[1] - expected) < 1e-4, (losses(out), expected)
    final = Llama.load(out / "final", kernels="torch")
    assert final.config.tie_embeddings and final.config.rope_type == "llama3" and final.config.head_dim == 16
    assert (out / "final" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_a_resumed_run_reads_its_checkpoint_not_init_from(two_process_run, tiny_hf_with_tokenizer, counting,
                                                          tmp_path):
    out = tmp_path / "out"
    first = run(args_for(tiny_hf_with_tokenizer, counting, out, "--stop-after-steps", "1"), tmp_path)
    assert "loaded into the shards" in first.stdout
    again = run(args_for(tiny_hf_with_tokenizer, counting, out, "--resume", "auto"), tmp_path)
    checkpoint = out / "checkpoints" / "step-000001"
    assert f"--init-from {tiny_hf_with_tokenizer} is not read: resuming from {checkpoint}" in again.stdout
    assert f"resumed from {checkpoint} at step 1" in again.stdout
    # step 2 continues from the weights after step 1 (1 process now, 2 before: summation order only)
    reference = losses(two_process_run[0])
    assert abs(losses(out)[2] - reference[2]) < 1e-4, (losses(out), reference)
    assert abs(reference[2] - reference[1]) > 1e-3  # step 1 changed the weights, so this tells them apart
    # and that pretraining checkpoint, as --init-from of a new run: its weights after step 1, a fresh
    # schedule (samples 0 and 1 again), checked against the unsharded load of the same directory
    again = run(args_for(checkpoint, counting, tmp_path / "continued", "--no-save", steps=1), tmp_path)
    assert f"weights of {checkpoint} loaded into the shards" in again.stdout
    x, y = MixtureSampler([SourceSpec(counting, 1.0)], BLOCK, 42, 512).batch(range(2))
    with torch.no_grad():
        logits = load_model_from_any(checkpoint, kernels="torch").eval()(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert abs(losses(tmp_path / "continued")[1] - expected) < 1e-4, (losses(tmp_path / "continued"), expected)
    assert abs(expected - reference[1]) > 1e-3  # not the weights before step 1


# ---- refusals, in-process through main(argv): exit 2 before anything is written -----------------
@pytest.fixture(scope="module")
def chatml_shards(hf_tokenizers, tmp_path_factory):
    """data_prep's shards (summary.json and all) of the conftest byte-level BPE, ChatML files."""
    root = tmp_path_factory.mktemp("chatml_shards")
    write_slimpajama(root / "corpus")
    tokenize("slimpajama", root / "corpus", root / "eos", hf_tokenizers["chatml"], workers=1)
    tokenize("slimpajama", root / "corpus", root / "endoftext", hf_tokenizers["chatml"], workers=1,
             eos_token="<|endoftext|>")
    return root


def ckpt_with(tmp_path, tokenizer_dir, vocab_size=600, name="ckpt"):
    """Our consolidated checkpoint of a random tiny model, with the tokenizer files of `tokenizer_dir`."""
    directory = tmp_path / name
    Llama(Config.from_name("tiny", vocab_size=vocab_size), kernels="torch").save(directory)
    for path in tokenizer_dir.iterdir():
        shutil.copyfile(path, directory / path.name)
    return directory


def refused(argv, capsys, out) -> str:
    assert tinyllama.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists(), err
    return err


def test_shards_of_the_same_tokenizer_pass_under_either_separator(chatml_shards, hf_tokenizers):
    tok = Tokenizer(hf_tokenizers["chatml"])
    assert init_from.check_shards_tokenizer(tok, [chatml_shards / "eos", chatml_shards / "endoftext"], "x") == []


def test_shards_of_another_tokenizer_are_refused(chatml_shards, hf_tokenizers, tmp_path, capsys):
    # Another tokenizer of the same size: two tokens' ids swapped (texts get other ids).
    other = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "other")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġmodel"] = vocab["Ġmodel"], vocab["Ġthe"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    ckpt = ckpt_with(tmp_path, other)
    out = tmp_path / "out"
    for shards in ("eos", "endoftext"):
        err = refused(args_for(ckpt, chatml_shards / shards, out), capsys, out)
        assert f"{chatml_shards / shards / 'summary.json'}: the shards were tokenized with " \
               f"{(hf_tokenizers['chatml'] / 'tokenizer.json').resolve()}" in err, err
        assert f"not with --init-from {ckpt}'s tokenizer {ckpt / 'tokenizer.json'}" in err, err
    # and a tokenizer of another size, through the shard headers' vocab_size (no summary needed)
    counting = learnable_corpus(tmp_path / "counting", 0, n_tokens=400)  # vocab_size 512 in its headers
    ckpt = ckpt_with(tmp_path, hf_tokenizers["chatml"], name="ckpt-600")
    err = refused(args_for(ckpt, counting, out), capsys, out)
    assert "shard-0000.bin: the header's vocab_size is 512" in err and f"{ckpt / 'tokenizer.json'} has 600" in err


def test_shape_flags_that_contradict_init_from_are_refused(chatml_shards, hf_tokenizers, tmp_path, capsys):
    ckpt = ckpt_with(tmp_path, hf_tokenizers["chatml"])
    out = tmp_path / "out"
    err = refused(args_for(ckpt, chatml_shards / "eos", out, "--config", "tinyllama-1.1b"), capsys, out)
    assert f"--config tinyllama-1.1b contradicts --init-from {ckpt} in vocab_size, n_layer" in err, err
    err = refused(args_for(ckpt, chatml_shards / "eos", out, "--vocab-size", "512"), capsys, out)
    assert f"--vocab-size 512 contradicts --init-from {ckpt}, whose vocab_size is 600" in err, err
    other = ckpt_with(tmp_path, hf_tokenizers["zephyr"], name="zephyr")
    err = refused(args_for(ckpt, chatml_shards / "eos", out, "--tokenizer", str(other)), capsys, out)
    assert f"--tokenizer {other / 'tokenizer.json'} is not the tokenizer of --init-from {ckpt}" in err, err
    # flags that agree are accepted; --block-size sets the windows, the model keeps its longer context
    agreed = init_from.resolve(ckpt, "tiny", 600, 16)
    assert (agreed.config, agreed.window) == (Config.load(ckpt / "config.json"), 16)
    assert init_from.resolve(ckpt, None, None, 512).config.block_size == 512


def test_a_missing_init_from_is_refused(counting, tmp_path, capsys):
    # every bad checkpoint (GGUF, unsupported architecture or RoPE, a tokenizer larger than the
    # embedding) through --init-from as through the other commands: tests/test_bad_checkpoints.py
    out = tmp_path / "out"
    err = refused(args_for(tmp_path / "missing", counting, out), capsys, out)
    assert f"--init-from {tmp_path / 'missing'}: no such checkpoint directory" in err, err
