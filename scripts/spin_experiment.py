"""The SFT-vs-SPIN study (second version): from one SFT model θ0, SPIN vs more SFT vs a DPO
control, matched in optimizer steps, scored on a checkable answer with paired tests.

    python scripts/spin_experiment.py --out /tmp/spin_study                 (small model, from scratch)
    python scripts/spin_experiment.py --out /tmp/spin_quick --quick         (every stage, tiny, ~1 min: CI)
    python scripts/spin_experiment.py --out /tmp/spin_real --base-ckpt SMOLLM2_DIR \
        [--picks-from /tmp/spin_study/results.json]                          (a pretrained chat model)

Task: "What is A plus B?" -> "A plus B is C." (A, B < --max-operand): one answer format that
follows from the prompt, so a real and a generated answer differ in whether the sum is right,
not in a form drawn at random. Rows are split into train (SFT rows and SPIN prompts), val
(>= 1,000 rows: the plateau and every choice of settings) and test (the reported numbers and
the paired tests), over disjoint operand pairs.

  1. θ0: a sentencepiece tokenizer and a random small Llama (or --base-ckpt), SFT at a constant
     lr with the val loss after every epoch; the lowest is the plateau; θ0 = SFT for that many
     epochs with the lr decayed (--theta0 annealed) or that checkpoint itself (plateau)
  2. three arms from θ0, each K x S optimizer steps of --batch rows/pairs:
       spin  K iterations of finetune/spin.py, S steps each (--iteration-steps), the opponent
             sampled at --temperature 1, RMSprop with its state carried across iterations
             (--carry-optimizer-state) and a warmup each iteration reaches (--warmup-steps)
       sft   finetune/sft.py for K x S steps on the train rows (the "more SFT" arm)
       dpo   finetune/spin.py --pairs: one iteration of K x S steps, chosen = the real answer,
             rejected = a known-wrong one (the same sentence with the sum off by 1 or 10)
  3. sweep (seed --seeds[0]): spin and dpo over --betas x their lrs, sft over its lrs; each
     arm's pick = best val accuracy (then val log-likelihood); the table says when a pick sits
     on the grid's edge (the sweep does not bracket it)
  4. the picks at every seed of --seeds; test accuracy (greedy answer == the right sentence)
     and log-likelihood per answer token; paired tests of the arms on the test rows: the
     accuracy difference with a paired bootstrap CI over rows (seeds kept together) and exact
     McNemar p-values per seed (scripts/paired_stats.py)

--base-ckpt DIR (an HF chat model, e.g. SmolLM2-135M-Instruct): no sweep; θ0 = DIR after SFT
to its plateau on the train rows, then the arms at one setting each (--picks-from a
small-model study's results.json, else the first value of each grid flag), 3 seeds.

Output: OUT/results.md (tables), OUT/results.json (every number, per-row test correctness of
the picks), OUT/study.png (plots), OUT/jobs/*.json (one per training run with its wall time;
a re-run skips finished jobs and refuses an OUT made with other settings, except the grids,
--seeds and --bootstrap: extend a grid whose pick sits on its edge by re-running with it). Jobs run --workers
at a time, one CPU thread each. docs/spin.md: how to run it and what it shows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from model.atomic import write_text  # noqa: E402
from paired_stats import discordant, mcnemar_exact, paired_bootstrap  # noqa: E402

PROMPT = "What is {a} plus {b}?"
ANSWER = "{a} plus {b} is {c}."
ARMS = ("spin", "sft", "dpo")
# (A, B) -> the pair of arms compared, A - B; θ0 is one model (no seeds)
COMPARISONS = (("spin", "sft"), ("spin", "theta0"), ("sft", "theta0"), ("dpo", "theta0"), ("spin", "dpo"))
WRONG_OFFSETS = (-10, -1, 1, 10)  # the DPO control's rejected sums: near misses, as a model's errors are


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds, a 1-cell sweep: checks every "
                   "stage (CI); the numbers mean nothing")
    p.add_argument("--base-ckpt", type=Path, default=None, help="a pretrained (chat) model to start from "
                   "instead of a random small one; no sweep, 3 seeds unless --seeds")
    p.add_argument("--picks-from", type=Path, default=None, help="with --base-ckpt: take each arm's lr and β "
                   "from this small-model study's results.json")
    p.add_argument("--seeds", type=ints, default=None, help="seeds of the runs from θ0 (default 0,1,2,3,4; "
                   "0,1,2 with --base-ckpt); the sweep runs at the first")
    p.add_argument("--k", type=int, default=3, help="SPIN iterations; every arm runs k x --iteration-steps steps")
    p.add_argument("--iteration-steps", type=int, default=None,
                   help="optimizer steps per SPIN iteration (default: one pass over --spin-prompts)")
    p.add_argument("--batch", type=int, default=32, help="rows (SFT) or pairs (SPIN, DPO) per optimizer step")
    p.add_argument("--max-operand", type=int, default=100)
    p.add_argument("--train-rows", type=int, default=800,
                   help="800: θ0 lands mid-way through the jump to adding right (docs/spin.md); 2,000 rows "
                   "take it to 99%%")
    p.add_argument("--val-rows", type=int, default=1000)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--spin-prompts", type=int, default=None, help="train prompts answered per SPIN iteration "
                   "(default: all train rows)")
    p.add_argument("--sft-epochs", type=int, default=22,
                   help="the plateau scan's length (22 with 800 rows: θ0 scores 30-60%%; by epoch 26 ~80%%)")
    p.add_argument("--sft-lr", type=float, default=2e-3, help="the plateau scan's constant lr")
    p.add_argument("--theta0", choices=("annealed", "plateau"), default="plateau",
                   help="annealed: at 800 rows the cosine rerun never makes the jump (~10%%)")
    p.add_argument("--more-sft-lrs", type=floats, default=[1e-4, 5e-4, 2e-3])
    p.add_argument("--spin-lrs", type=floats, default=[1e-5, 3e-5, 1e-4])
    p.add_argument("--dpo-lrs", type=floats, default=[1e-5, 3e-5, 1e-4])
    p.add_argument("--betas", type=floats, default=[0.3, 1.0, 3.0, 10.0], help="β grid of spin and dpo")
    p.add_argument("--temperature", type=float, default=1.0, help="SPIN's opponent: sampled at T (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--spin-optimizer", choices=("rmsprop", "adamw"), default="rmsprop")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 24 (the longest answer is 14 tokens with EOS); 48 with --base-ckpt")
    p.add_argument("--max-len", type=int, default=None, help="prompt + answer tokens (default 64; 192 with "
                   "--base-ckpt, whose template adds a system turn)")
    p.add_argument("--max-prompt-len", type=int, default=None, help="default 32; 128 with --base-ckpt")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test rows")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the rows, tokenizer and initial model")
    p.add_argument("--workers", type=int, default=2, help="training runs at a time (one CPU thread each)")
    args = p.parse_args(argv)
    real = args.base_ckpt is not None
    if args.seeds is None:
        args.seeds = [0, 1, 2] if real else [0, 1, 2, 3, 4]
    args.max_new_tokens = args.max_new_tokens or (48 if real else 24)
    args.max_len = args.max_len or (192 if real else 64)
    args.max_prompt_len = args.max_prompt_len or (128 if real else 32)
    if args.quick:
        args.seeds, args.k = args.seeds[:2], 2
        args.train_rows, args.val_rows, args.test_rows, args.sft_epochs = 128, 64, 64, 2
        args.more_sft_lrs, args.spin_lrs, args.dpo_lrs = args.more_sft_lrs[-1:], args.spin_lrs[-1:], args.dpo_lrs[-1:]
        args.betas, args.bootstrap, args.batch = args.betas[1:2], 200, 16
    if args.spin_prompts is None:
        args.spin_prompts = args.train_rows
    if args.iteration_steps is None:
        args.iteration_steps = max(1, args.spin_prompts // args.batch)
    if args.k < 1 or args.sft_epochs < 1 or not args.seeds:
        p.error("--k and --sft-epochs must be >= 1 and --seeds not empty")
    if args.spin_prompts > args.train_rows:
        p.error(f"--spin-prompts {args.spin_prompts} exceeds --train-rows {args.train_rows}")
    if args.picks_from is not None and not real:
        p.error("--picks-from goes with --base-ckpt (the small-model study makes its own picks)")
    if real and not args.base_ckpt.is_dir():
        p.error(f"--base-ckpt {args.base_ckpt}: not a directory (an HF model directory or one of ours)")
    return args


# data, tokenizer, model --------------------------------------------------------------------
def answer(a: int, b: int, c: int | None = None) -> str:
    return ANSWER.format(a=a, b=b, c=a + b if c is None else c)


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    return rng.choice([a + b + d for d in WRONG_OFFSETS if a + b + d >= 0])


def make_rows(args) -> dict[str, list[dict]]:
    """train/val/test rows over disjoint operand pairs, in the UltraChat layout finetune/ reads;
    train rows also carry the DPO control's known-wrong answer."""
    operands = [(a, b) for a in range(args.max_operand) for b in range(args.max_operand)]
    random.Random(args.data_seed).shuffle(operands)
    sizes = {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows}
    if len(operands) < sum(sizes.values()):
        raise SystemExit(f"error: --max-operand {args.max_operand} gives {len(operands)} operand pairs; the "
                         f"splits need {sum(sizes.values())}")
    wrong = random.Random(args.data_seed + 1)
    rows, start = {}, 0
    for split, n in sizes.items():
        rows[split] = []
        for a, b in operands[start:start + n]:
            prompt = PROMPT.format(a=a, b=b)
            row = {"prompt_id": f"{a}+{b}", "a": a, "b": b,
                   "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(a, b)}]}
            if split == "train":
                row["wrong"] = answer(a, b, wrong_sum(a, b, wrong))
            rows[split].append(row)
        start += n
    return rows


def dpo_pairs(train: list[dict]) -> list[dict]:
    """The DPO control's pairs in SPIN's released layout (finetune/spin.py --pairs)."""
    return [{"prompt_id": r["prompt_id"], "real": r["messages"],
             "generated": [r["messages"][0], {"role": "assistant", "content": r["wrong"]}]} for r in train]


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_base(args, train: list[dict]) -> Path:
    """--base-ckpt, or a sentencepiece tokenizer trained on the task text and a random small Llama."""
    if args.base_ckpt is not None:
        return args.base_ckpt
    import sentencepiece as spm
    import torch

    from model import Config, Llama

    base = args.out / "base"
    if (base / "model.safetensors").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.txt"
    corpus.write_text("\n".join(f"<|user|>\n{r['messages'][0]['content']}\n<|assistant|>\n"
                                f"{r['messages'][1]['content']}" for r in train))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(args.out / "tok"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    os.replace(args.out / "tok.model", base / "tokenizer.model")
    torch.manual_seed(args.data_seed)
    config = Config(name="spin-study", vocab_size=300, n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
                    intermediate_size=352, block_size=args.max_len)
    Llama(config, kernels="torch").save(base)
    return base


# training runs (the product's own commands) -------------------------------------------------
def run_cli(script: str, flags: list, log: Path) -> None:
    cmd = [sys.executable, str(REPO / "finetune" / script), *map(str, flags)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"{script} failed (exit {r.returncode}); its output: {log}\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-15:]))


def batch_flags(args) -> list:
    return ["--global-batch-size", args.batch, "--micro-batch-size", args.batch, "--kernels", "torch"]


def val_curve(out: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]


def sft_plateau(args, base: Path) -> tuple[Path, dict]:
    """θ0: SFT for as long as the held-out loss improves (the first study's rule, kept).

    A constant-lr scan gives the val loss after every epoch; its lowest point is the plateau.
    --theta0 annealed trains again for that many epochs with a cosine decay (a model taken
    mid-way at a constant lr gives any continuation with a decaying lr a free gain from the
    annealing alone); --theta0 plateau takes that epoch's checkpoint.
    """
    scan = args.out / "sft_plateau_scan"
    data = ["--data", args.out / "train.jsonl", "--val-data", args.out / "val.jsonl", "--lr", args.sft_lr,
            "--warmup-ratio", 0.02, "--seed", args.data_seed, "--max-seq-len", args.max_len, *batch_flags(args)]
    if not (scan / "final" / "model.safetensors").is_file():
        run_cli("sft.py", ["--ckpt", base, "--out", scan, "--epochs", args.sft_epochs, "--lr-schedule", "constant",
                           "--save-every-epoch", *data], args.out / "sft_plateau_scan.log")
    curve = val_curve(scan)
    best = min(range(1, len(curve)), key=curve.__getitem__)
    plateau = {"val_loss": curve, "theta0_epoch": best, "reached": best < args.sft_epochs, "theta0": args.theta0}
    if not plateau["reached"]:
        print(f"warning: the val loss still fell in the last SFT epoch ({curve[-2]:.4f} -> {curve[-1]:.4f}): "
              f"θ0 is not at a plateau; raise --sft-epochs", flush=True)
    if args.theta0 == "plateau":
        return (scan / "final" if best == args.sft_epochs else scan / f"epoch{best}"), \
            plateau | {"theta0_val_loss": curve[best]}
    out = args.out / "sft_theta0"
    if not (out / "final" / "model.safetensors").is_file():
        run_cli("sft.py", ["--ckpt", base, "--out", out, "--epochs", best, "--lr-schedule", "cosine", *data],
                args.out / "sft_theta0.log")
    return out / "final", plateau | {"theta0_val_loss": val_curve(out)[-1]}


def job_name(job: tuple) -> str:
    arm, lr, beta, seed = job
    return f"{arm}_lr{lr:g}_s{seed}" if arm == "sft" else f"{arm}_lr{lr:g}_b{beta:g}_s{seed}"


def total_steps(args) -> int:
    return args.k * args.iteration_steps


def spin_flags(args, lr: float, beta: float, seed: int, steps: int) -> list:
    """spin.py's flags shared by the spin and dpo arms: the recipe of docs/spin.md's second study."""
    return ["--max-len", args.max_len, "--max-prompt-len", args.max_prompt_len, "--max-new-tokens",
            args.max_new_tokens, "--gen-batch-size", 100, "--temperature", args.temperature, "--top-p", args.top_p,
            "--capped-generations", "eos", "--iteration-steps", steps, "--warmup-steps", max(1, round(0.1 * steps)),
            "--lr", lr, "--lr-later", lr, "--optimizer", args.spin_optimizer, "--carry-optimizer-state",
            "--beta", beta, "--seed", seed, "--no-progress", *batch_flags(args)]


def train_job(args, theta0: Path, job: tuple) -> tuple[list[Path], dict]:
    """Run one job's training; (its checkpoints in order, what to record besides the scores)."""
    arm, lr, beta, seed = job
    out = args.out / "runs" / job_name(job)
    log = out.parent / f"{job_name(job)}.log"
    if arm == "sft":
        per_epoch = args.train_rows // args.batch
        run_cli("sft.py", ["--ckpt", theta0, "--data", args.out / "train.jsonl", "--out", out,
                           "--epochs", math.ceil(total_steps(args) / per_epoch), "--max-steps", total_steps(args),
                           "--lr", lr, "--lr-schedule", "linear", "--warmup-ratio", 0.1, "--seed", seed,
                           "--max-seq-len", args.max_len, *batch_flags(args)], log)
        return [out / "final"], {}
    if arm == "dpo":
        run_cli("spin.py", ["--ckpt", theta0, "--pairs", args.out / "dpo_pairs.jsonl", "--out", out,
                            "--iterations", 1, "--num-prompts", args.train_rows,
                            *spin_flags(args, lr, beta, seed, total_steps(args))], log)
        return [out / "iter1"], {"pairs": [json.loads((out / "work" / "iter0" / "pairs_stats.json").read_text())]}
    run_cli("spin.py", ["--ckpt", theta0, "--data", args.out / "train.jsonl", "--out", out, "--iterations", args.k,
                        "--num-prompts", args.spin_prompts, *spin_flags(args, lr, beta, seed, args.iteration_steps)],
            log)
    pairs = [json.loads((out / "work" / f"iter{t}" / "pairs_stats.json").read_text()) for t in range(args.k)]
    return [out / f"iter{t}" for t in range(1, args.k + 1)], {"pairs": pairs}


def run_job(args, theta0: Path, job: tuple) -> dict:
    """Train one job and score its models (in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    start = time.time()
    ckpts, extra = train_job(args, theta0, job)
    trained = time.time() - start
    arm, lr, beta, seed = job
    result = {"name": job_name(job), "arm": arm, "lr": lr, "beta": beta, "seed": seed, **extra,
              "val": evaluate(args, ckpts[-1], "val"), "test": evaluate(args, ckpts[-1], "test", keep_rows=True)}
    if len(ckpts) > 1:  # SPIN: the test accuracy after every iteration (the curve)
        result["test_by_iteration"] = [evaluate(args, c, "test")["accuracy"] for c in ckpts[:-1]] + \
            [result["test"]["accuracy"]]
    result["seconds"] = {"train": trained, "total": time.time() - start}
    write_text(args.out / "jobs" / f"{result['name']}.json", json.dumps(result, indent=1))
    return result


# evaluation --------------------------------------------------------------------------------
def evaluate(args, ckpt: Path, split: str, keep_rows: bool = False) -> dict:
    """Greedy answers of `ckpt` to the split's prompts, in its chat template: accuracy (the answer
    is the right sentence), well-formed share (the right sentence for some sum), and the
    log-likelihood per answer token of the real answers."""
    import torch

    from finetune.chat import IGNORE_INDEX, pad_right, sft_row
    from finetune.checkpoints import load_start
    from finetune.generate import generate_batch
    from finetune.hf_chat import chat_encoder
    from finetune.losses import sequence_logps

    rows = [json.loads(line) for line in (args.out / f"{split}.jsonl").read_text().splitlines()]
    model, tok, template = load_start(ckpt, kernels="torch")
    model.eval()
    enc = chat_encoder(tok, template)
    encoded = [enc.encode_example(r["messages"][0]["content"], r["messages"][1]["content"], args.max_len)
               for r in rows]
    prompts, real = [p for p, _ in encoded], [a for _, a in encoded]
    logps, answers = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 100):
            chunk = [sft_row(p, a) for p, a in zip(prompts[start:start + 100], real[start:start + 100])]
            ids = torch.tensor(pad_right([c[0] for c in chunk], tok.pad_id))
            labels = torch.tensor(pad_right([c[1] for c in chunk], IGNORE_INDEX))
            logps += sequence_logps(model(ids), labels).tolist()
            answers += generate_batch(model, prompts[start:start + 100], args.max_new_tokens, enc.stop_ids,
                                      tok.pad_id)
    texts = [tok.decode([i for i in a if i not in enc.stop_ids]).strip() for a in answers]
    correct = [int(t == answer(r["a"], r["b"])) for t, r in zip(texts, rows)]
    formed = [t.startswith(f"{r['a']} plus {r['b']} is ") and t.endswith(".") for t, r in zip(texts, rows)]
    result = {"accuracy": sum(correct) / len(rows), "well_formed": sum(formed) / len(rows),
              "ll_per_token": sum(logps) / sum(len(a) for a in real), "rows": len(rows)}
    if keep_rows:
        result["correct"] = correct
    return result


# summary -----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def grid(args, arm: str) -> list[tuple[float, float | None]]:
    lrs = {"spin": args.spin_lrs, "dpo": args.dpo_lrs, "sft": args.more_sft_lrs}[arm]
    return [(lr, None) for lr in lrs] if arm == "sft" else [(lr, beta) for lr in lrs for beta in args.betas]


def pick_cell(args, runs: list[dict], arm: str) -> dict:
    """The arm's best sweep cell on val (accuracy, then log-likelihood) and whether the grid brackets it."""
    sweep = {(r["lr"], r["beta"]): r for r in runs if r["arm"] == arm and r["seed"] == args.seeds[0]}
    lr, beta = max(sweep, key=lambda cell: (sweep[cell]["val"]["accuracy"], sweep[cell]["val"]["ll_per_token"]))
    lrs = sorted({c[0] for c in sweep})
    edges = {"lr": len(lrs) > 1 and lr in (lrs[0], lrs[-1])}
    if beta is not None:
        betas = sorted({c[1] for c in sweep})
        edges["beta"] = len(betas) > 1 and beta in (betas[0], betas[-1])
    return {"lr": lr, "beta": beta, "on_edge": [k for k, v in edges.items() if v],
            "sweep": [{"lr": c[0], "beta": c[1], "val_accuracy": r["val"]["accuracy"],
                       "val_ll_per_token": r["val"]["ll_per_token"]} for c, r in sorted(sweep.items(),
                                                                                    key=lambda i: (i[0][0], i[0][1] or 0))]}


def base_picks(args) -> dict:
    """--base-ckpt: one setting per arm, from --picks-from or the first value of each grid flag."""
    if args.picks_from is not None:
        try:
            picks = json.loads(args.picks_from.read_text())["picks"]
            return {arm: {"lr": picks[arm]["lr"], "beta": picks[arm]["beta"], "on_edge": [], "sweep": [],
                          "from": str(args.picks_from)} for arm in ARMS}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --picks-from {args.picks_from}: no picks of arms {', '.join(ARMS)} "
                             f"({type(e).__name__}: {e}); give a results.json of this script") from e
    return {arm: {"lr": grid(args, arm)[0][0], "beta": grid(args, arm)[0][1], "on_edge": [], "sweep": [],
                  "from": "the first value of each grid flag"} for arm in ARMS}


def paired_tests(args, theta0_correct: list[int], runs: list[dict], picks: dict) -> list[dict]:
    """Every comparison of COMPARISONS on the test rows, at the picks."""
    def rows_of(arm):  # per test row, the 0/1 of each seed
        if arm == "theta0":
            return [[c] for c in theta0_correct], {s: theta0_correct for s in args.seeds}
        mine = {r["seed"]: r["test"]["correct"] for r in runs if r["arm"] == arm
                and (r["lr"], r["beta"]) == (picks[arm]["lr"], picks[arm]["beta"])}
        seeds = sorted(mine)
        return [[mine[s][i] for s in seeds] for i in range(len(theta0_correct))], mine

    out = []
    for a, b in COMPARISONS:
        rows_a, by_seed_a = rows_of(a)
        rows_b, by_seed_b = rows_of(b)
        per_seed = []
        for seed in args.seeds:
            bc = discordant(by_seed_a[seed], by_seed_b[seed])
            per_seed.append({"seed": seed, "a_only": bc[0], "b_only": bc[1], "p": mcnemar_exact(*bc)})
        out.append({"a": a, "b": b, **paired_bootstrap(rows_a, rows_b, resamples=args.bootstrap, seed=args.data_seed),
                    "mcnemar": per_seed})
    return out


def label(arm: str, pick: dict | None = None) -> str:
    names = {"spin": "SPIN", "sft": "more SFT", "dpo": "DPO (wrong sums rejected)", "theta0": "θ0"}
    if pick is None:
        return names[arm]
    return names[arm] + f" lr {pick['lr']:g}" + (f" β {pick['beta']:g}" if pick["beta"] is not None else "")


def summarize(args, runs: list[dict], picks: dict) -> dict:
    """{arm: test/val numbers at the pick, mean and std over seeds}."""
    table = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm and (r["lr"], r["beta"]) == (picks[arm]["lr"], picks[arm]["beta"])]
        entry = {"seeds": sorted(r["seed"] for r in mine)}
        for split in ("val", "test"):
            for metric in ("accuracy", "well_formed", "ll_per_token"):
                entry[f"{split}_{metric}"] = mean_std([r[split][metric] for r in mine])
        if arm == "spin":
            entry["test_by_iteration"] = [mean_std([r["test_by_iteration"][t] for r in mine]) for t in range(args.k)]
            entry["capped_per_iteration"] = [statistics.fmean(r["pairs"][t]["generations_at_max_new_tokens"]
                                                              for r in mine) for t in range(args.k)]
            entry["pairs_per_iteration"] = [statistics.fmean(r["pairs"][t]["pairs"] for r in mine)
                                            for t in range(args.k)]
        table[arm] = entry
    return table


def fmt(pair, digits: int = 3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def report(args, plateau: dict, theta0: dict, picks: dict, table: dict, tests: list[dict], runs: list[dict],
           seconds: float) -> str:
    curve = plateau["val_loss"]
    band = 0.3 <= theta0["test"]["accuracy"] <= 0.6
    lines = [f"θ0: SFT at a constant lr {args.sft_lr:g}; val loss per epoch "
             + ", ".join(f"{v:.4f}" for v in curve[1:]) + f"; lowest after epoch {plateau['theta0_epoch']} "
             f"(plateau {'reached' if plateau['reached'] else 'NOT reached'}), θ0 {plateau['theta0']}.",
             f"θ0 test accuracy {theta0['test']['accuracy']:.3f} ({'inside' if band else 'OUTSIDE'} the 0.3-0.6 band "
             f"the study is sized for), log-lik/token {theta0['test']['ll_per_token']:.4f}.",
             f"Every arm: {total_steps(args)} optimizer steps of {args.batch} rows/pairs (SPIN: {args.k} iterations "
             f"x {args.iteration_steps}).", ""]
    if any(p["sweep"] for p in picks.values()):
        lines += [f"Sweep (seed {args.seeds[0]}, {args.val_rows} val rows); * = the arm's pick:", "",
                  "| arm | lr | β | val accuracy | val log-lik / token |", "|---|---|---|---|---|"]
        for arm in ARMS:
            for cell in picks[arm]["sweep"]:
                mark = " *" if (cell["lr"], cell["beta"]) == (picks[arm]["lr"], picks[arm]["beta"]) else ""
                beta = "-" if cell["beta"] is None else f"{cell['beta']:g}"
                lines.append(f"| {label(arm)}{mark} | {cell['lr']:g} | {beta} | {cell['val_accuracy']:.3f} | "
                             f"{cell['val_ll_per_token']:.4f} |")
        for arm in ARMS:
            if picks[arm]["on_edge"]:
                lines.append(f"\nwarning: {label(arm)}'s pick is on the edge of the grid in "
                             f"{' and '.join(picks[arm]['on_edge'])}: the sweep does not bracket it; extend it")
        lines.append("")
    lines += [f"Test ({args.test_rows} rows), the picks, mean ± std over seeds {', '.join(map(str, args.seeds))}:", "",
              "| model | test accuracy | well-formed | test log-lik / token | val accuracy |", "|---|---|---|---|---|",
              f"| θ0 | {theta0['test']['accuracy']:.3f} | {theta0['test']['well_formed']:.3f} | "
              f"{theta0['test']['ll_per_token']:.4f} | {theta0['val']['accuracy']:.3f} |"]
    for arm in ARMS:
        e = table[arm]
        lines.append(f"| {label(arm, picks[arm])} | {fmt(e['test_accuracy'])} | {fmt(e['test_well_formed'])} | "
                     f"{fmt(e['test_ll_per_token'], 4)} | {fmt(e['val_accuracy'])} |")
    lines += ["", f"Paired tests on the test rows (difference of accuracy A − B, mean over seeds; "
                  f"{int(tests[0]['level'] * 100)}% paired bootstrap CI over rows, {args.bootstrap} resamples; "
                  f"exact McNemar p per seed, with the rows only A / only B got right):", "",
              "| A − B | difference | CI | McNemar p per seed (A only / B only) |", "|---|---|---|---|"]
    for t in tests:
        per_seed = ", ".join(f"{m['p']:.3g} ({m['a_only']}/{m['b_only']})" for m in t["mcnemar"])
        lines.append(f"| {label(t['a'])} − {label(t['b'])} | {t['diff']:+.3f} | [{t['ci_low']:+.3f}, "
                     f"{t['ci_high']:+.3f}] | {per_seed} |")
    spin = table["spin"]
    lines += ["", "SPIN per iteration (test accuracy; generations capped at --max-new-tokens, ended with EOS; pairs "
                  "kept): " + "; ".join(f"{t + 1}: {fmt(spin['test_by_iteration'][t])}, "
                                        f"{spin['capped_per_iteration'][t]:.0f} capped, "
                                        f"{spin['pairs_per_iteration'][t]:.0f} pairs" for t in range(args.k))]
    train_minutes = sum(r["seconds"]["total"] for r in runs) / 60
    lines.append(f"\n{len(runs)} training runs ({train_minutes:.1f} min of worker time), {seconds / 60:.1f} min "
                 f"with {args.workers} worker(s)")
    return "\n".join(lines)


def plot(path: Path, args, plateau: dict, theta0: dict, picks: dict, table: dict, tests: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")     # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    curve = plateau["val_loss"]
    axes[0].plot(range(1, len(curve)), curve[1:], marker=".")
    axes[0].axvline(plateau["theta0_epoch"], color="grey", linestyle="--", label="θ0's epochs")
    axes[0].set(title="SFT at a constant lr: val loss / answer token", xlabel="epoch", yscale="log")
    axes[0].legend()
    for ax, arm in zip(axes[1:3], ("spin", "dpo")):
        cells = picks[arm]["sweep"]
        lrs, betas = sorted({c["lr"] for c in cells}), sorted({c["beta"] for c in cells})
        if cells:
            value = {(c["lr"], c["beta"]): c["val_accuracy"] for c in cells}
            image = ax.imshow([[value.get((lr, b), float("nan")) for b in betas] for lr in lrs], cmap="viridis",
                              aspect="auto")
            for i, lr in enumerate(lrs):
                for j, b in enumerate(betas):
                    ax.text(j, i, f"{value.get((lr, b), float('nan')):.2f}", ha="center", va="center", color="w")
            ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
            ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
            fig.colorbar(image, ax=ax)
        ax.set(title=f"{label(arm)}: val accuracy (sweep)", xlabel="β", ylabel="lr")
    models = ["theta0", *ARMS]
    means = [theta0["test"]["accuracy"]] + [table[a]["test_accuracy"][0] for a in ARMS]
    stds = [0.0] + [table[a]["test_accuracy"][1] for a in ARMS]
    axes[3].bar(range(4), means, yerr=stds, capsize=4, color=["grey", "C0", "C1", "C2"])
    axes[3].set_xticks(range(4), [label(m) for m in models], rotation=15, fontsize=8)
    axes[3].set(title="test accuracy at the picks (± std over seeds)")
    names = [f"{label(t['a'])} − {label(t['b'])}" for t in tests]
    diffs = [t["diff"] for t in tests]
    errors = [[t["diff"] - t["ci_low"] for t in tests], [t["ci_high"] - t["diff"] for t in tests]]
    axes[4].errorbar(diffs, range(len(tests)), xerr=errors, fmt="o", capsize=4)
    axes[4].axvline(0, color="grey", linestyle="--")
    axes[4].set_yticks(range(len(tests)), names, fontsize=8)
    axes[4].set(title="accuracy difference, paired bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Flags that only choose which jobs run (a job's name holds its lr, β and seed) or how the summary
# is computed: a re-run may change them, e.g. to extend a grid whose pick sits on its edge.
GROWABLE = ("more_sft_lrs", "spin_lrs", "dpo_lrs", "betas", "seeds", "bootstrap")


def check_same_study(args) -> None:
    """A re-run reuses OUT's finished runs, so it must be the same study: other settings are refused
    (the GROWABLE flags excepted; study_args.json then records their latest values)."""
    path = args.out / "study_args.json"
    mine = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "workers")}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in mine.keys() | before.keys() if mine.get(k) != before.get(k) and k not in GROWABLE)
        if changed:
            raise SystemExit(f"error: {path} holds a study with other settings ("
                             + ", ".join(f"--{k.replace('_', '-')} {before.get(k)} -> {mine.get(k)}" for k in changed)
                             + "); use another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(mine, indent=1))


def run_jobs(args, theta0: Path, jobs: list[tuple], t0: float) -> list[dict]:
    """The jobs' results: finished ones read from OUT/jobs, the others run --workers at a time."""
    runs, todo = [], []
    for job in jobs:
        done = args.out / "jobs" / f"{job_name(job)}.json"
        (runs.append(json.loads(done.read_text())) if done.is_file() else todo.append(job))
    print(f"    {len(jobs)} runs ({len(jobs) - len(todo)} already done), {args.workers} at a time", flush=True)
    if todo:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_job, args, theta0, job) for job in todo]
            for n, future in enumerate(as_completed(futures), start=1):
                run = future.result()
                runs.append(run)
                print(f"    [{n}/{len(todo)}] {run['name']}: val accuracy {run['val']['accuracy']:.3f}, log-lik "
                      f"{run['val']['ll_per_token']:.4f} ({run['seconds']['total']:.0f} s; "
                      f"{(time.time() - t0) / 60:.1f} min)", flush=True)
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    check_same_study(args)
    (args.out / "jobs").mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    rows = make_rows(args)
    for split, split_rows in rows.items():
        write_jsonl(args.out / f"{split}.jsonl", split_rows)
    write_jsonl(args.out / "dpo_pairs.jsonl", dpo_pairs(rows["train"]))
    base = make_base(args, rows["train"])
    print(f"1/4 θ0: SFT from {'--base-ckpt' if args.base_ckpt else 'a random model'} for up to {args.sft_epochs} "
          f"epochs ({args.train_rows} rows)", flush=True)
    theta0, plateau = sft_plateau(args, base)
    theta0_scores = {"val": evaluate(args, theta0, "val"), "test": evaluate(args, theta0, "test", keep_rows=True)}
    print(f"    θ0 after epoch {plateau['theta0_epoch']}: val accuracy {theta0_scores['val']['accuracy']:.3f}, "
          f"test {theta0_scores['test']['accuracy']:.3f}", flush=True)

    if args.base_ckpt is None:
        print("2/4 sweep", flush=True)
        sweep = [(arm, lr, beta, args.seeds[0]) for arm in ARMS for lr, beta in grid(args, arm)]
        runs = run_jobs(args, theta0, sweep, t0)
        picks = {arm: pick_cell(args, runs, arm) for arm in ARMS}
    else:
        print("2/4 no sweep (--base-ckpt): one setting per arm", flush=True)
        runs, picks = [], base_picks(args)
    print("3/4 the picks at every seed: " + "; ".join(label(a, picks[a]) for a in ARMS), flush=True)
    seeded = [(arm, picks[arm]["lr"], picks[arm]["beta"], seed) for arm in ARMS for seed in args.seeds]
    names = {r["name"] for r in runs}
    runs += [r for r in run_jobs(args, theta0, seeded, t0) if r["name"] not in names]

    print("4/4 summary", flush=True)
    table = summarize(args, runs, picks)
    tests = paired_tests(args, theta0_scores["test"]["correct"], runs, picks)
    seconds = time.time() - t0
    text = report(args, plateau, theta0_scores, picks, table, tests, runs, seconds)
    print(text, flush=True)
    write_text(args.out / "results.md", text + "\n")
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "plateau": plateau, "theta0": theta0_scores, "picks": picks, "table": table, "tests": tests,
               "runs": sorted(runs, key=lambda r: r["name"]), "seconds": seconds}
    write_text(args.out / "results.json", json.dumps(results, indent=1))
    plot(args.out / "study.png", args, plateau, theta0_scores, picks, table, tests)
    print(f"wrote {args.out / 'results.md'}, results.json and study.png ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
