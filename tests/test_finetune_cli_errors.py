"""Bad input to finetune/sft.py and finetune/spin.py through the command line: each case
is exit code 2 with a message naming the flag or file, and no checkpoint, state or
half-written file left behind. Refusals call the scripts' main(argv) in this process
(conftest.run_main); the runs that train start the real scripts in subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_main
from finetune import sft, spin
from model import Config, Llama

REPO = Path(__file__).resolve().parents[1]
TINY = Config.from_name("tiny")  # vocab 512, context 128


def save_ckpt(directory: Path, tokenizer: Path, config: Config = TINY, edit=None) -> Path:
    torch.manual_seed(0)
    model = Llama(config, kernels="torch")
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save(directory)
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory


def answers_only_eos(model: Llama) -> None:
    """Every position's logits favour EOS (id 2) by a wide margin: the blocks add nothing to
    the residual stream, every token embeds to the same vector, and only lm_head's EOS row is
    non-zero. Sampled answers are then EOS alone, i.e. empty."""
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.down.weight")):
            p.zero_()
    model.embed.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    model.lm_head.weight[2] = 1.0


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("ckpts")
    return {"ok": save_ckpt(root / "ok", tiny_tokenizer),
            "small_vocab": save_ckpt(root / "small_vocab", tiny_tokenizer, Config.from_name("tiny", vocab_size=300)),
            "eos": save_ckpt(root / "eos", tiny_tokenizer, edit=answers_only_eos)}


def write_chat(path: Path, exchanges: list[tuple[str, str]]) -> Path:
    """A chat .jsonl in the UltraChat layout, one row per (user, assistant) exchange."""
    rows = [{"prompt_id": f"q{i}", "messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": answer}]}
            for i, (user, answer) in enumerate(exchanges)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("chat") / "chat.jsonl", [(f"name {i}", f"it is {i}") for i in range(24)])


# spin.py flags that fit the tiny model's 128-token context, for cases about something else
SPIN_SMALL = ["--iterations", 1, "--num-prompts", 16, "--max-new-tokens", 4, "--max-prompt-len", 32,
              "--max-len", 64, "--gen-batch-size", 8, "--global-batch-size", 8, "--micro-batch-size", 4,
              "--epochs", 1, "--no-progress"]


def run(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "finetune" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def refused(script: str, *args) -> subprocess.CompletedProcess:
    """A run expected to be refused, as main(argv) in this process."""
    return run_main({"sft.py": sft.main, "spin.py": spin.main}[script], *args)


def assert_refused(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def leftovers(out: Path) -> list[str]:
    """Files in `out` that a refused run must not leave: checkpoints, state, temporaries."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith(".") or p.name in ("final", "state.json", "model.safetensors")
                  or p.name.startswith("iter") and p.parent == out)


BAD_FLAGS = {
    ("sft.py", "max-seq-len beyond the context"): (
        ["--max-seq-len", 129], "--max-seq-len 129 exceeds the model's block_size 128"),
    ("sft.py", "batch sizes that do not divide"): (
        ["--global-batch-size", 10, "--micro-batch-size", 4],
        "--global-batch-size 10 must be a multiple of --micro-batch-size 4 x 1 device(s)"),
    ("sft.py", "fewer rows than the global batch"): (
        ["--num-examples", 8, "--global-batch-size", 16, "--micro-batch-size", 4],
        "only 8 training rows but --global-batch-size is 16"),
    ("spin.py", "max-len beyond the context"): (
        ["--max-prompt-len", 32, "--max-new-tokens", 4, "--max-len", 200],
        "--max-len 200 exceeds the model's context (128)"),
    ("spin.py", "prompt + new tokens beyond the context"): (
        ["--max-prompt-len", 100, "--max-new-tokens", 40],
        "--max-prompt-len 100 + --max-new-tokens 40 exceeds the model's context (128)"),
    ("spin.py", "max-prompt-len not below max-len (defaulted)"): (
        ["--max-prompt-len", 128], "--max-prompt-len 128 must be below --max-len 128"),
}


@pytest.mark.parametrize("script,case", sorted(BAD_FLAGS))
def test_bad_flags(ckpts, chat, tmp_path, script, case):
    flags, message = BAD_FLAGS[script, case]
    out = tmp_path / "out"
    result = refused(script, "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *flags)
    assert_refused(result, message)
    assert leftovers(out) == []


@pytest.mark.parametrize("script", ["sft.py", "spin.py"])
def test_tokenizer_larger_than_the_vocabulary(ckpts, chat, tmp_path, script):
    out = tmp_path / "out"
    flags = SPIN_SMALL if script == "spin.py" else []
    result = refused(script, "--ckpt", ckpts["small_vocab"], "--data", chat, "--out", out, *flags)
    assert_refused(result, f"tokenizer {ckpts['small_vocab'] / 'tokenizer.model'} has 512 pieces",
                   "vocab_size is 300")
    assert leftovers(out) == []


@pytest.mark.parametrize("script", ["sft.py", "spin.py"])
@pytest.mark.parametrize("missing", ["ckpt", "data"])
def test_missing_files(ckpts, chat, tmp_path, script, missing):
    paths = {"ckpt": ckpts["ok"], "data": chat}
    paths[missing] = tmp_path / f"no_such_{missing}"
    out = tmp_path / "out"
    flags = SPIN_SMALL if script == "spin.py" else []
    result = refused(script, "--ckpt", paths["ckpt"], "--data", paths["data"], "--out", out, *flags)
    assert_refused(result, str(paths[missing]))
    assert leftovers(out) == []


def test_spin_corrupt_state_json(ckpts, chat, tmp_path):
    out = tmp_path / "spin"
    out.mkdir()
    (out / "state.json").write_text('{"completed_iterations": ')
    result = refused("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *SPIN_SMALL)
    assert_refused(result, f"{out / 'state.json'}: not valid JSON")
    assert (out / "state.json").read_text() == '{"completed_iterations": '  # left for the user to look at
    assert not (out / "work").exists() and not (out / "iter1").exists()


def test_spin_with_no_pairs_to_train_on(ckpts, tmp_path):
    # The real answers are empty (EOS alone) and every generated answer is EOS alone too:
    # every pair is identical and dropped.
    chat = tmp_path / "empty_answers.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"name {i}"},
                                                     {"role": "assistant", "content": ""}]}) + "\n"
                            for i in range(16)))
    out = tmp_path / "spin"
    result = refused("spin.py", "--ckpt", ckpts["eos"], "--data", chat, "--out", out, *SPIN_SMALL)
    assert_refused(result, f"{out / 'work' / 'iter0' / 'pairs.jsonl'}: no pairs to train on",
                   "see pairs_stats.json")
    stats = json.loads((out / "work" / "iter0" / "pairs_stats.json").read_text())
    assert stats["pairs"] == 0 and stats["dropped_identical"] == 16 and stats["dropped_empty"] == 0
    assert not (out / "state.json").exists() and not (out / "iter1").exists()
    assert not (out / "work" / "iter0" / "ref_logps.pt").exists()
    assert [p.name for p in out.rglob(".*")] == []


def test_spin_keeps_eos_only_answers_and_counts_per_iteration(ckpts, tmp_path):
    """Answers that are EOS alone are valid rejected answers; pairs_stats.json counts each
    iteration on its own (the real answers are cut to --max-len in both iterations: 16 each)."""
    chat = tmp_path / "long_answers.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"name {i}"},
                                                     {"role": "assistant", "content": "it is " * 40}]}) + "\n"
                            for i in range(16)))
    out = tmp_path / "spin"
    flags = [a if a != 1 else 2 for a in SPIN_SMALL]  # --iterations 2 --epochs 2
    result = run("spin.py", "--ckpt", ckpts["eos"], "--data", chat, "--out", out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    for t in (0, 1):
        stats = json.loads((out / "work" / f"iter{t}" / "pairs_stats.json").read_text())
        assert stats["pairs"] == 16 and stats["eos_only_answers"] == 16 and stats["dropped_empty"] == 0, stats
        assert stats["responses_truncated"] == 16 and stats["generations_at_max_new_tokens"] == 0, stats


def test_spin_default_lengths_fit_a_small_context(ckpts, chat, tmp_path):
    """No length flags on a 128-token model: the defaults are fitted to its context (the
    paper's 512 + 256 would not fit) and the fitted values are on record."""
    out = tmp_path / "spin"
    flags = [a for a in SPIN_SMALL]
    for name in ("--max-new-tokens", "--max-prompt-len", "--max-len"):
        i = flags.index(name)
        del flags[i:i + 2]
    result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *flags, "--temperature", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((out / "run_args.json").read_text())
    assert (recorded["max_prompt_len"], recorded["max_new_tokens"], recorded["max_len"]) == ("64", "64", "128")


def test_spin_counts_generations_that_reach_max_new_tokens(ckpts, chat, tmp_path):
    out = tmp_path / "spin"
    result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *SPIN_SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "work" / "iter0" / "generations.jsonl").read_text().splitlines()]
    unstopped = sum(not r["stopped"] for r in rows)
    assert unstopped == sum(len(r["generated_ids"]) == 4 and r["generated_ids"][-1] != 2 for r in rows) > 0
    stats = json.loads((out / "work" / "iter0" / "pairs_stats.json").read_text())
    assert stats["generations_at_max_new_tokens"] == unstopped


def test_spin_batch_sizes_that_do_not_divide(ckpts, chat, tmp_path):
    out = tmp_path / "spin"
    flags = [a if a != 8 else 10 for a in SPIN_SMALL]  # --gen-batch-size and --global-batch-size 10
    result = refused("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *flags)
    assert_refused(result, "--global-batch-size 10 must be a multiple of --micro-batch-size 4 x 1 device(s)")
    assert not (out / "state.json").exists() and not (out / "iter1").exists()
    assert [p.name for p in out.rglob(".*")] == []


def test_spin_trains_on_given_pairs_without_data(ckpts, tmp_path):
    """--pairs in SPIN's released layout: iteration 0 trains on the file's answers (nothing is
    generated), --data is not needed, and --num-prompts samples rows at random."""
    from data_prep.tokenizer import load_tokenizer

    rows = [{"real": [{"role": "user", "content": f"name {i}"}, {"role": "assistant", "content": f"it is {i}"}],
             "generated": [{"role": "user", "content": f"name {i}"}, {"role": "assistant", "content": f"no {i}"}]}
            for i in range(24)]
    pairs = tmp_path / "SPIN_iter0.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "spin"
    result = run("spin.py", "--ckpt", ckpts["ok"], "--pairs", pairs, "--out", out, *SPIN_SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    tok = load_tokenizer(ckpts["ok"])
    kept = [json.loads(l) for l in (out / "work" / "iter0" / "pairs.jsonl").read_text().splitlines()]
    assert len(kept) == 16
    row_numbers = [int(p["prompt_id"]) for p in kept]  # no prompt_id in the file: its line number
    assert row_numbers == sorted(row_numbers) and row_numbers != list(range(1, 17))
    for p in kept:
        i = row_numbers[kept.index(p)] - 1
        assert p["generated_ids"] == tok.encode(f"no {i}") + [tok.eos_id]
        assert p["real_ids"] == tok.encode(f"it is {i}") + [tok.eos_id]
    assert (out / "iter1" / "model.safetensors").is_file()
    assert not (out / "work" / "iter0" / "generations.rank0.jsonl").exists()  # nothing was generated
