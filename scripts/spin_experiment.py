"""A small, CPU-sized SPIN experiment: more SFT epochs vs SPIN iterations from the same SFT model.

    python scripts/spin_experiment.py --out /tmp/spin_exp [--sft-epochs 30] [--extra-epochs 6] [--iterations 2]

Task (answers can be checked): "add A B" -> "A + B = C" for A, B < --max-operand. The rows are
split into train prompts (SFT and SPIN data) and held-out prompts (evaluation only).

  1. train a sentencepiece tokenizer on the task text and a randomly initialised small Llama
  2. SFT it on the train rows for --sft-epochs (to a plateau): θ0     (finetune/sft.py)
  3. (a) continue SFT from θ0 for --extra-epochs more epochs            (finetune/sft.py)
     (b) SPIN from θ0 for --iterations iterations on the same prompts  (finetune/spin.py)
  4. evaluate θ0, (a) and every SPIN iterate on the held-out prompts: mean log-likelihood per
     answer token of the real answers, greedy exact-match accuracy, and the share of greedy
     answers that end with EOS.

It prints a markdown table (also written to OUT/results.md and OUT/results.json). The numbers
depend on the seed and the sizes; read docs/spin.md for what they do and do not show.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-operand", type=int, default=100)
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--heldout-rows", type=int, default=200)
    p.add_argument("--sft-epochs", type=int, default=5)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--extra-epochs", type=int, default=2, help="more SFT for the comparison arm")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--spin-prompts", type=int, default=1000)
    p.add_argument("--spin-epochs", type=int, default=2)
    p.add_argument("--spin-lr", type=float, default=1e-4)
    p.add_argument("--spin-beta", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_data(args) -> tuple[list[dict], list[dict]]:
    rng = random.Random(args.seed)
    pairs = [(a, b) for a in range(args.max_operand) for b in range(args.max_operand)]
    rng.shuffle(pairs)
    need = args.train_rows + args.heldout_rows
    if len(pairs) < need:
        raise SystemExit(f"error: only {len(pairs)} distinct sums for --max-operand {args.max_operand}; "
                         f"need {need} rows")
    rows = [{"prompt": f"add {a} {b}", "prompt_id": f"{a}+{b}",
             "messages": [{"role": "user", "content": f"add {a} {b}"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]} for a, b in pairs[:need]]
    return rows[:args.train_rows], rows[args.train_rows:]


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_base(args, train) -> Path:
    import sentencepiece as spm

    from model import Config, Llama

    base = args.out / "base"
    if (base / "model.safetensors").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.txt"
    corpus.write_text("\n".join(f"<|user|>\n{r['prompt']}\n<|assistant|>\n{r['messages'][1]['content']}"
                                for r in train))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(args.out / "tok"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    os.replace(args.out / "tok.model", base / "tokenizer.model")
    torch.manual_seed(args.seed)
    config = Config(name="spin-exp", vocab_size=300, n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
                    intermediate_size=352, block_size=64)
    Llama(config, kernels="torch").save(base)
    return base


def cli(script: str, *args):
    cmd = [sys.executable, str(REPO / "finetune" / script), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit(f"{script} failed:\n{r.stderr[-3000:]}")


@torch.no_grad()
def evaluate(ckpt: Path, heldout: list[dict]) -> dict:
    from finetune.chat import ChatEncoder, ChatTemplate, IGNORE_INDEX, pad_right, sft_row
    from finetune.generate import generate_batch
    from finetune.losses import sequence_logps
    from finetune.tokenizer import load_tokenizer
    from model import Llama

    model = Llama.load(ckpt, kernels="torch").eval()
    tok = load_tokenizer(ckpt)
    enc = ChatEncoder(tok, ChatTemplate.load(ckpt))
    ll, n_tok, correct, stopped = 0.0, 0, 0, 0
    for start in range(0, len(heldout), 50):
        chunk = heldout[start:start + 50]
        encoded = [enc.encode_example(r["prompt"], r["messages"][1]["content"], 64) for r in chunk]
        rows = [sft_row(p, a) for p, a in encoded]
        ids = torch.tensor(pad_right([r[0] for r in rows], tok.pad_id))
        labels = torch.tensor(pad_right([r[1] for r in rows], IGNORE_INDEX))
        ll += float(sequence_logps(model(ids), labels).sum())
        n_tok += int((labels != IGNORE_INDEX).sum())
        outs = generate_batch(model, [p for p, _ in encoded], 16, tok.eos_id, tok.pad_id)
        for r, o in zip(chunk, outs):
            want = r["messages"][1]["content"].split("=")[-1].strip()
            m = re.search(r"=\s*(\d+)", tok.decode(o))
            correct += bool(m and m.group(1) == want)
            stopped += bool(o) and o[-1] == tok.eos_id
    return {"heldout_ll_per_token": ll / n_tok, "heldout_accuracy": correct / len(heldout),
            "stops_with_eos": stopped / len(heldout)}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, heldout = make_data(args)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    base = make_base(args, train)
    bs = ["--global-batch-size", 32, "--micro-batch-size", 16, "--kernels", "torch"]
    sft = args.out / "sft"
    if not (sft / "final" / "model.safetensors").is_file():
        cli("sft.py", "--ckpt", base, "--data", args.out / "train.jsonl", "--out", sft,
            "--epochs", args.sft_epochs, "--lr", args.sft_lr, "--warmup-ratio", 0.05, *bs)
    more = args.out / "sft_more"
    if not (more / "final" / "model.safetensors").is_file():
        # The same constant learning rate SPIN gets, so the two arms differ only in the objective.
        cli("sft.py", "--ckpt", sft / "final", "--data", args.out / "train.jsonl", "--out", more,
            "--epochs", args.extra_epochs, "--lr", args.spin_lr, "--lr-schedule", "constant",
            "--warmup-ratio", 0, *bs)
    spin = args.out / "spin"
    cli("spin.py", "--ckpt", sft / "final", "--data", args.out / "train.jsonl", "--out", spin,
        "--iterations", args.iterations, "--num-prompts", args.spin_prompts, "--max-new-tokens", 16,
        "--max-prompt-len", 32, "--max-len", 64, "--gen-batch-size", 64, "--temperature", args.temperature,
        "--epochs", args.spin_epochs, "--schedule-epochs", args.spin_epochs, "--lr", args.spin_lr, "--lr-later", args.spin_lr,
        "--optimizer", "rmsprop", "--beta", args.spin_beta, "--global-batch-size", 32,
        "--micro-batch-size", 16, "--kernels", "torch", "--no-progress")

    results = {}
    runs = [("SFT θ0 (plateau)", sft / "final", "none"),
            ("SFT θ0 + more SFT", more / "final", f"{args.extra_epochs} epochs x {len(train)} rows")]
    runs += [(f"SPIN iter{t}", spin / f"iter{t}",
              f"{t} iteration(s) x {args.spin_epochs} epochs x {args.spin_prompts}(+prev) pairs")
             for t in range(1, args.iterations + 1)]
    for name, ckpt, extra in runs:
        results[name] = {"extra_training": extra, **evaluate(ckpt, heldout)}
    stats = {t: json.loads((spin / "work" / f"iter{t}" / "pairs_stats.json").read_text())
             for t in range(args.iterations)}
    lines = ["| model | extra training | held-out log-lik / answer token | held-out exact match | stops with EOS |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['extra_training']} | {r['heldout_ll_per_token']:.4f} | "
                     f"{r['heldout_accuracy']:.3f} | {r['stops_with_eos']:.3f} |")
    table = "\n".join(lines)
    summary = "\n".join(f"iteration {t}: {s['pairs']} pairs kept, {s['dropped_identical']} identical to the "
                        f"real answer dropped, {s['dropped_empty']} empty dropped" for t, s in stats.items())
    print(table + "\n\n" + summary + f"\n\n({time.time() - t0:.0f} s)")
    (args.out / "results.md").write_text(table + "\n\n" + summary + "\n")
    (args.out / "results.json").write_text(json.dumps({"results": results, "pairs": stats,
                                                       "args": {k: str(v) for k, v in vars(args).items()}},
                                                      indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
