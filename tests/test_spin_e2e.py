"""finetune/sft.py and finetune/spin.py end to end on a tiny checkpoint, including a kill + resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main

from model import Config, Llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "base"
    torch.manual_seed(0)
    Llama(Config.from_name("tiny"), kernels="torch").save(d)
    shutil.copyfile(tiny_tokenizer, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "train.jsonl"
    with path.open("w") as f:
        for i in range(64):
            a, b = i % 9, (i * 7) % 11
            f.write(json.dumps({"prompt": f"add {a} {b}", "prompt_id": f"id{i}",
                                "messages": [{"role": "user", "content": f"add {a} {b}"},
                                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}"}]}) + "\n")
    return path


def run_cli(script, *args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "finetune" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=240, **kw)


def test_sft_writes_final_checkpoint_and_metrics(tiny_ckpt, chat_file, tmp_path):
    out = tmp_path / "sft"
    r = run_cli("sft.py", "--ckpt", tiny_ckpt, "--data", chat_file, "--out", out, "--max-steps", 4,
                "--global-batch-size", 8, "--micro-batch-size", 4, "--lr", 1e-3)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.model", "chat_template.json", "chat_template.jinja"):
        assert (out / "final" / name).is_file(), name
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 4 and losses[-1] < losses[0]
    reloaded = Llama.load(out / "final")
    assert reloaded.config == Config.from_name("tiny")


def test_sft_bad_data_is_a_clear_error(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    from finetune import sft

    r = run_main(sft.main, "--ckpt", tiny_ckpt, "--data", bad, "--out", tmp_path / "o")
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr and "assistant" in r.stderr


@pytest.mark.slow
def test_spin_two_iterations_survive_a_kill(tiny_ckpt, chat_file, tmp_path):
    out = tmp_path / "spin"
    args = ["--ckpt", tiny_ckpt, "--data", chat_file, "--out", out, "--iterations", 2, "--num-prompts", 48,
            "--max-new-tokens", 24, "--max-prompt-len", 32, "--max-len", 64, "--gen-batch-size", 1,
            "--global-batch-size", 8, "--micro-batch-size", 4, "--epochs", 1, "--lr", 1e-4, "--no-progress"]
    # killed mid-generation, at its 5th row (tests/spin_kill_probe.py): the merged file (stage done) not yet written
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "spin_kill_probe.py"), "5", *map(str, args)],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    part = out / "work" / "iter0" / "generations.rank0.jsonl"
    assert part.read_text().count("\n") == 5 and not (out / "work" / "iter0" / "generations.jsonl").exists()

    r = run_cli("spin.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    for t in (1, 2):
        assert (out / f"iter{t}" / "model.safetensors").is_file() and (out / f"iter{t}" / "tokenizer.model").is_file()
    assert json.loads((out / "state.json").read_text())["completed_iterations"] == 2
    for t in (0, 1):
        gen_file = out / "work" / f"iter{t}" / "generations.jsonl"
        gens = [json.loads(l)["index"] for l in gen_file.read_text().splitlines()]
        assert gens == list(range(48))
        pairs = [json.loads(l) for l in (out / "work" / f"iter{t}" / "pairs.jsonl").read_text().splitlines()]
        ids = [p["prompt_id"] for p in pairs]
        assert len(ids) == len(set(ids)) and pairs
        stats = json.loads((out / "work" / f"iter{t}" / "pairs_stats.json").read_text())
        assert stats["pairs"] + stats["dropped_identical"] + stats["dropped_empty"] == 48
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("iteration" in l for l in lines)
    train = [l for l in lines if "rewards/margins" in l]
    assert {l["iteration"] for l in train} == {0, 1}
    for key in ("loss", "rewards/real", "rewards/generated", "rewards/accuracies", "logps/real", "logps/generated"):
        assert key in train[0]
    # The first step's policy equals the reference (θt), so the loss is exactly log 2.
    assert abs(train[0]["loss"] - 0.6931) < 1e-3
    assert not torch.equal(Llama.load(out / "iter1").lm_head.weight, Llama.load(tiny_ckpt).lm_head.weight)

    # a third run has nothing left to do
    r = run_cli("spin.py", *args)
    assert r.returncode == 0 and "already complete" in r.stdout
    # resuming with flags that change the stored stages is refused, naming the flag
    changed = [a if a != 48 else 40 for a in args]
    r = run_cli("spin.py", *changed)
    assert r.returncode != 0 and "--num-prompts was 48" in r.stderr
