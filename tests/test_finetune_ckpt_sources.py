"""`--ckpt` of sft.py and spin.py takes every checkpoint the project reads: our consolidated
format, a Hugging Face Llama directory, a pretraining checkpoint and a pretraining output
directory. The same weights reached through different layouts give the same first step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_spin_e2e import chat_file, run_cli  # noqa: F401  (fixture)

from data_prep.shards import write_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrain_out(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-step tiny pretraining run: checkpoints/step-000002 and final/ hold the same weights."""
    root = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    write_shard(root / "a_00000.bin", rng.integers(3, 512, 20_000), vocab_size=512, eos_id=2, num_docs=1)
    out = root / "out"
    cmd = [sys.executable, str(REPO / "pretrain" / "tinyllama.py"), "--config", "tiny", "--data", f"{root}:1",
           "--out", str(out), "--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "2",
           "--num-workers", "0", "--wandb-mode", "disabled", "--tokenizer", str(tiny_tokenizer), "--save-every", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def first_sft_loss(ckpt, chat_file, out) -> float:
    r = run_cli("sft.py", "--ckpt", ckpt, "--data", chat_file, "--out", out, "--max-steps", 1,
                "--global-batch-size", 4, "--micro-batch-size", 4, "--lr", 1e-3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    return next(json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line))


@pytest.mark.slow
def test_sft_reads_hf_and_consolidated_alike(tiny_checkpoints, chat_file, tmp_path):  # noqa: F811
    # "base" and "hf" are one model saved in our format and exported to HF's.
    ours = first_sft_loss(tiny_checkpoints["base"], chat_file, tmp_path / "ours")
    hf = first_sft_loss(tiny_checkpoints["hf"], chat_file, tmp_path / "hf")
    assert hf == pytest.approx(ours, abs=1e-5)


@pytest.mark.slow
def test_sft_reads_a_pretraining_checkpoint_and_output_directory(pretrain_out, chat_file, tmp_path):  # noqa: F811
    from_final = first_sft_loss(pretrain_out / "final", chat_file, tmp_path / "final")
    from_step = first_sft_loss(pretrain_out / "checkpoints" / "step-000002", chat_file, tmp_path / "step")
    from_out = first_sft_loss(pretrain_out, chat_file, tmp_path / "outdir")
    assert from_step == pytest.approx(from_final, abs=1e-6) and from_out == pytest.approx(from_final, abs=1e-6)


def test_spin_reads_a_pretraining_output_directory(pretrain_out, chat_file, tmp_path):  # noqa: F811
    out = tmp_path / "spin"
    r = run_cli("spin.py", "--ckpt", pretrain_out, "--data", chat_file, "--out", out, "--iterations", 1,
                "--num-prompts", 8, "--max-new-tokens", 8, "--max-prompt-len", 32, "--max-len", 64,
                "--global-batch-size", 8, "--micro-batch-size", 4, "--epochs", 1, "--lr", 1e-4, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "iter1" / "model.safetensors").is_file() and (out / "iter1" / "tokenizer.model").is_file()
