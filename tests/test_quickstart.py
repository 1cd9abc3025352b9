"""The README's first command, at its smallest setting: every stage runs for real and leaves
valid output (shards readable, checkpoints that load, SPIN pairs, an HF directory that
transformers loads with the same logits, pictures and sample answers)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import require_module

from data_prep import iter_documents, list_shards, read_shard
from model import Llama

pytestmark = pytest.mark.slow  # the whole pipeline runs once for this module (~1.5 min on 2 cores)


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("quickstart") / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    result = subprocess.run([sys.executable, "scripts/quickstart.py", "--size", "smoke", "--out", str(out)],
                            cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result.stdout


def test_summary_reports_every_stage(quickstart_out):
    _, stdout = quickstart_out
    for line in ("tokens prepared", "pretraining loss", "validation loss", "SPIN iteration 0",
                 "SPIN iteration 1", "before SPIN", "after SPIN", "HF export"):
        assert line in stdout


def test_summary_ends_with_a_working_chat_command(quickstart_out, request):
    out, stdout = quickstart_out
    last = stdout.strip().splitlines()[-1]
    command = last.split("  ", 1)[1].split()
    assert last.startswith("chat with what it trained:") and command[:2] == ["python", "scripts/chat.py"]
    assert command[2:] == ["--ckpt", str(out.resolve() / "spin" / "iter2")]
    result = subprocess.run([sys.executable, *command[1:], "--max-new-tokens", "8"], input="What does json.dumps do?\n",
                            cwd=request.config.rootpath, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chat template: " in result.stderr and "chat_template.json" in result.stderr


def test_token_shards_are_readable(quickstart_out):
    out, _ = quickstart_out
    vocab = Llama.load(out / "pretrain" / "final").config.vocab_size
    for source in ("slimpajama", "starcoder"):
        for split in ("train", "validation"):
            shards = list_shards(out / "data" / source / split)
            assert shards, f"no shards for {source}/{split}"
            tokens = read_shard(shards[0])
            assert tokens.size > 0 and int(tokens.max()) < vocab
            summary = json.loads((out / "data" / source / split / "summary.json").read_text())
            docs = list(iter_documents(out / "data" / source / split))  # EOS removed
            assert len(docs) == summary["documents"] > 0
            assert sum(len(d) + 1 for d in docs) == summary["tokens"]


def test_checkpoints_load_and_pretraining_learned(quickstart_out):
    out, _ = quickstart_out
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    for ckpt in ("pretrain/final", "sft/final", "spin/iter1", "spin/iter2"):
        model = Llama.load(out / ckpt)
        assert (out / ckpt / "tokenizer.model").is_file()
        assert all(torch.isfinite(p).all() for p in model.parameters()), ckpt


def test_spin_pairs_and_rewards(quickstart_out):
    out, _ = quickstart_out
    for it in (0, 1):
        pairs = [json.loads(line) for line in (out / "spin" / "work" / f"iter{it}" / "pairs.jsonl").read_text().splitlines()]
        assert pairs
        ids = [p["prompt_id"] for p in pairs]
        assert len(ids) == len(set(ids)), "duplicated SPIN pairs"
        assert all(p["real_ids"] != p["generated_ids"] and p["generated_ids"] for p in pairs)
    rows = [json.loads(line) for line in (out / "spin" / "metrics.jsonl").read_text().splitlines()]
    assert {r["iteration"] for r in rows if "rewards/margins" in r} == {0, 1}


def test_hf_export_loads_in_transformers(quickstart_out):
    transformers = require_module("transformers")
    out, _ = quickstart_out
    ours = Llama.load(out / "spin" / "iter2", kernels="torch")
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    assert "chat_template" in json.loads((out / "hf" / "tokenizer_config.json").read_text())


def test_pictures_and_samples(quickstart_out):
    out, _ = quickstart_out
    for png in ("pretrain.png", "spin.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = json.loads((out / "samples.json").read_text())
    assert samples and all({"prompt", "human", "before", "after"} <= set(s) for s in samples)


def _quickstart(out, request):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "scripts/quickstart.py", "--size", "smoke", "--out", str(out)]
                          + (["--fresh"] if out.name == "fresh" else []),
                          cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=900)


def test_interrupted_quickstart_continues_and_fresh_starts_over(quickstart_out, tmp_path, request):
    import shutil

    out, _ = quickstart_out
    # As if it had been stopped during the last stage: its output is missing, the rest is done.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "samples.json").unlink()
    result = _quickstart(resumed, request)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("already done") == 6  # corpus, tokenizer, tokenize, pretrain, SFT, SPIN
    assert "--- export to Hugging Face format, plot, sample answers" in result.stdout
    assert json.loads((resumed / "samples.json").read_text())

    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    (fresh / "leftover.txt").write_text("from an older run")
    result = _quickstart(fresh, request)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "already done" not in result.stdout and not (fresh / "leftover.txt").exists()
    assert (fresh / "pretrain" / "final" / "model.safetensors").is_file() and (fresh / "samples.json").is_file()
