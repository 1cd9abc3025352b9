"""The SFT-vs-SPIN study: from one plateaued SFT model, k more SFT epochs vs k SPIN iterations.

    python scripts/spin_experiment.py --out /tmp/spin_study           (the study, ~9 min on 2 CPU cores)
    python scripts/spin_experiment.py --out /tmp/spin_quick --quick   (every stage, tiny, ~1 min: CI)

The paper's claim (Chen et al. 2024, SPIN): once SFT has plateaued, SPIN iterations on the
same prompts improve the model more than further SFT epochs do. This script tests that claim
on a task small enough for a CPU and whose answers can be checked.

Task: "add A B" -> "A + B = C" (A, B < --max-operand), rows split into train (SFT and SPIN
prompts), val (the plateau and the choice of hyper-parameters) and test (the reported numbers),
with disjoint operand pairs.

  1. a sentencepiece tokenizer and a randomly initialised small Llama (model/)
  2. SFT at a constant learning rate for --sft-epochs, held-out loss after every epoch
     (finetune/sft.py --val-data): the epoch with the lowest val loss is the plateau; θ0 = SFT
     for that many epochs with the learning rate decayed to 0 (cosine), as SFT models are made
  3. from θ0, for every seed and every setting of the sweep:
       more SFT: k epochs on the train rows                   (finetune/sft.py), lr in --more-sft-lrs
       SPIN:     k iterations on --spin-prompts train prompts (finetune/spin.py), lr x beta sweep
  4. every model after each epoch / iteration, on val and test:
       (a) log-likelihood per answer token of the real answers,
       (b) task score: exact match of the greedy answer with the real one,
       (c) reward margin: [log πθ(y|x) − log πθ0(y|x)] − [log πθ(y'|x) − log πθ0(y'|x)] with y the
           real answer and y' θ0's own answer (decoded as SPIN decodes), in nats (times β it is
           DPO's implicit reward margin; rows where y' = y are left out), and the share of rows
           where it is positive.
  5. per arm, the setting with the best mean val score (exact match, then log-likelihood) is
     the arm's pick; test numbers are reported as mean ± std over seeds for every setting.

Output: OUT/results.md (tables), OUT/results.json (every number), OUT/study.png (plot),
OUT/jobs/*.json (one per training run; a re-run skips finished jobs). Jobs run --workers at a
time, one CPU thread each. Read docs/spin.md for the numbers and what they do and do not show.
"""
from __future__ import annotations

import argparse
import json
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model.atomic import write_text  # noqa: E402

MAX_LEN = 64             # the model's context: prompt + answer of this task fit in ~30 tokens
MAX_PROMPT_LEN = 32
MAX_NEW_TOKENS = 16
BATCH = 32               # rows (SFT) or pairs (SPIN) per optimizer step
METRICS = ("ll_per_token", "exact_match", "margin", "margin_accuracy")
# Human answers vary in form; so do these. A row's real answer is one of the forms, drawn at random,
# so no model can predict it exactly: the held-out loss has a floor, and training long enough
# memorises each training row's form, which is how SFT overfits and its held-out loss turns up.
FORMS = ("{a} + {b} = {c}", "{a} plus {b} is {c}", "The sum is {c}.")


def valid_answers(a: int, b: int) -> list[str]:
    return [form.format(a=a, b=b, c=a + b) for form in FORMS]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 2 seeds, no sweep: checks every stage (CI), numbers mean nothing")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="seeds of the runs after θ0 (data order, "
                   "SPIN's prompt sample and sampling)")
    p.add_argument("--k", type=int, default=3, help="more-SFT epochs = SPIN iterations")
    p.add_argument("--max-operand", type=int, default=100)
    p.add_argument("--train-rows", type=int, default=600,
                   help="small enough that SFT plateaus, then overfits, before it learns to add")
    p.add_argument("--val-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, default=400)
    p.add_argument("--sft-epochs", type=int, default=30, help="the plateau run's length")
    p.add_argument("--sft-lr", type=float, default=2e-3, help="the plateau run's constant learning rate")
    p.add_argument("--more-sft-lrs", type=floats, default=[2e-3, 5e-4, 1e-4],
                   help="sweep of the more-SFT arm (linear decay over its k epochs)")
    p.add_argument("--spin-lrs", type=floats, default=[3e-5, 1e-4, 3e-4], help="sweep of the SPIN arm")
    p.add_argument("--betas", type=floats, default=[0.1, 1.0], help="sweep of the SPIN arm")
    p.add_argument("--spin-prompts", type=int, default=600, help="train prompts answered per SPIN iteration")
    p.add_argument("--spin-epochs", type=int, default=1, help="epochs over the pairs per SPIN iteration")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="SPIN's decoding (0 = greedy, the paper's setting); also y' of the margin")
    p.add_argument("--theta0", choices=("annealed", "plateau"), default="annealed",
                   help="annealed: SFT again for the plateau's epochs with the lr decayed; plateau: the "
                        "constant-lr checkpoint at the lowest val loss itself")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the rows, tokenizer and initial model")
    p.add_argument("--workers", type=int, default=2, help="training runs at a time (one CPU thread each)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.k = args.seeds[:2], 1
        args.train_rows, args.val_rows, args.test_rows = 200, 40, 40
        args.sft_epochs, args.spin_prompts = 3, 100
        args.more_sft_lrs, args.spin_lrs, args.betas = args.more_sft_lrs[:1], args.spin_lrs[:1], args.betas[:1]
    if args.k < 1 or args.sft_epochs < 1 or not args.seeds:
        p.error("--k and --sft-epochs must be >= 1 and --seeds not empty")
    if args.spin_prompts > args.train_rows:
        p.error(f"--spin-prompts {args.spin_prompts} exceeds --train-rows {args.train_rows}")
    return args


# data, tokenizer, model --------------------------------------------------------------------
def make_rows(args) -> dict[str, list[dict]]:
    """train/val/test rows over disjoint operand pairs, in the UltraChat layout finetune/ reads."""
    operands = [(a, b) for a in range(args.max_operand) for b in range(args.max_operand)]
    random.Random(args.data_seed).shuffle(operands)
    sizes = {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows}
    if len(operands) < sum(sizes.values()):
        raise SystemExit(f"error: --max-operand {args.max_operand} gives {len(operands)} distinct sums; "
                         f"the splits need {sum(sizes.values())}")
    forms = random.Random(args.data_seed + 1)
    rows, start = {}, 0
    for split, n in sizes.items():
        rows[split] = [{"prompt": f"add {a} {b}", "prompt_id": f"{a}+{b}", "valid": valid_answers(a, b),
                        "messages": [{"role": "user", "content": f"add {a} {b}"},
                                     {"role": "assistant", "content": forms.choice(valid_answers(a, b))}]}
                       for a, b in operands[start:start + n]]
        start += n
    return rows


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_base(args, train: list[dict]) -> Path:
    """A sentencepiece tokenizer trained on the task text and a randomly initialised Llama."""
    import sentencepiece as spm
    import torch

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
    torch.manual_seed(args.data_seed)
    config = Config(name="spin-study", vocab_size=300, n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
                    intermediate_size=352, block_size=MAX_LEN)
    Llama(config, kernels="torch").save(base)
    return base


# training runs (the product's own commands) -------------------------------------------------
def run_cli(script: str, args: list, log: Path) -> None:
    cmd = [sys.executable, str(REPO / "finetune" / script), *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"{script} failed (exit {r.returncode}); its output: {log}\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-15:]))


def common_flags() -> list:
    return ["--global-batch-size", BATCH, "--micro-batch-size", BATCH, "--kernels", "torch"]


def val_curve(out: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]


def sft_plateau(args, base: Path) -> tuple[Path, dict]:
    """θ0: SFT for as long as the held-out loss improves.

    First SFT at a constant lr for --sft-epochs, the val loss after every epoch: the epoch with
    the lowest is where SFT plateaus (after it, the model memorises the training rows).
    --theta0 plateau takes that epoch's checkpoint. --theta0 annealed (the default) trains SFT
    again from the random model for exactly that many epochs with a cosine decay: a model taken
    mid-way at a constant lr is not converged, and any arm that continues it with a decaying lr
    gains from the annealing alone, not from its objective (zephyr-7b-sft-full, the paper's
    start, was trained with its schedule run to the end).
    """
    scan = args.out / "sft_plateau_scan"
    data = ["--data", args.out / "train.jsonl", "--val-data", args.out / "val.jsonl", "--lr", args.sft_lr,
            "--warmup-ratio", 0.02, "--seed", args.data_seed, *common_flags()]
    if not (scan / "final" / "model.safetensors").is_file():
        run_cli("sft.py", ["--ckpt", base, "--out", scan, "--epochs", args.sft_epochs, "--lr-schedule", "constant",
                           "--save-every-epoch", *data], args.out / "sft_plateau_scan.log")
    curve = val_curve(scan)
    best = min(range(1, len(curve)), key=curve.__getitem__)
    if best == args.sft_epochs:
        print(f"warning: the val loss still fell in the last SFT epoch ({curve[-2]:.4f} -> {curve[-1]:.4f}): "
              f"θ0 is not at a plateau; raise --sft-epochs", flush=True)
    plateau = {"val_loss": curve, "theta0_epoch": best, "reached": best < args.sft_epochs, "theta0": args.theta0}
    if args.theta0 == "plateau":
        return (scan / "final" if best == args.sft_epochs else scan / f"epoch{best}"), \
            plateau | {"theta0_val_loss": curve[best]}
    out = args.out / "sft_theta0"
    if not (out / "final" / "model.safetensors").is_file():
        run_cli("sft.py", ["--ckpt", base, "--out", out, "--epochs", best, "--lr-schedule", "cosine", *data],
                args.out / "sft_theta0.log")
    return out / "final", plateau | {"theta0_val_loss": val_curve(out)[-1]}


def job_name(job: tuple) -> str:
    """("sft", lr, seed) or ("spin", lr, beta, seed) -> the run's directory and jobs/ file name."""
    if job[0] == "sft":
        return f"sft_lr{job[1]:g}_s{job[2]}"
    return f"spin_lr{job[1]:g}_b{job[2]:g}_s{job[3]}"


def sft_job(args, theta0: Path, lr: float, seed: int) -> dict:
    name = job_name(("sft", lr, seed))
    out = args.out / "runs" / name
    run_cli("sft.py", ["--ckpt", theta0, "--data", args.out / "train.jsonl", "--out", out, "--epochs", args.k,
                       "--lr", lr, "--lr-schedule", "linear", "--warmup-ratio", 0.1, "--save-every-epoch",
                       "--seed", seed, *common_flags()], out.parent / f"{name}.log")
    ckpts = [out / f"epoch{j}" for j in range(1, args.k)] + [out / "final"]
    return {"name": name, "arm": "sft", "lr": lr, "beta": None, "seed": seed, "ckpts": ckpts, "pairs": []}


def spin_job(args, theta0: Path, lr: float, beta: float, seed: int) -> dict:
    name = job_name(("spin", lr, beta, seed))
    out = args.out / "runs" / name
    run_cli("spin.py", ["--ckpt", theta0, "--data", args.out / "train.jsonl", "--out", out,
                        "--iterations", args.k, "--num-prompts", args.spin_prompts, "--max-len", MAX_LEN,
                        "--max-prompt-len", MAX_PROMPT_LEN, "--max-new-tokens", MAX_NEW_TOKENS,
                        "--gen-batch-size", 100, "--temperature", args.temperature,
                        "--epochs", args.spin_epochs, "--schedule-epochs", args.spin_epochs,
                        "--lr", lr, "--lr-later", lr, "--optimizer", "rmsprop", "--beta", beta,
                        "--warmup-ratio", 0.1, "--seed", seed, "--no-progress", *common_flags()],
            out.parent / f"{name}.log")
    pairs = [json.loads((out / "work" / f"iter{t}" / "pairs_stats.json").read_text()) for t in range(args.k)]
    # The training pairs' own reward accuracy and margin (in nats: rewards/margins / β) over the
    # last iteration, to set beside the held-out margin.
    last = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("iteration") == args.k - 1 and "rewards/margins" in r]
    train = {"margin": statistics.fmean(r["rewards/margins"] / beta for r in last),
             "accuracy": statistics.fmean(r["rewards/accuracies"] for r in last)}
    return {"name": name, "arm": "spin", "lr": lr, "beta": beta, "seed": seed, "train_last_iteration": train,
            "ckpts": [out / f"iter{t}" for t in range(1, args.k + 1)], "pairs": pairs}


def run_job(args, theta0: Path, job: tuple) -> dict:
    """Train one setting and evaluate each of its models (in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    kind, *values = job
    result = sft_job(args, theta0, *values) if kind == "sft" else spin_job(args, theta0, *values)
    ckpts = result.pop("ckpts")
    # Test after every epoch / iteration (the curves); val only at the end, where settings are picked.
    result["points"] = [{"k": k, "test": evaluate(ckpt, args.out / "reference_test.pt")}
                        for k, ckpt in enumerate(ckpts, start=1)]
    result["points"][-1]["val"] = evaluate(ckpts[-1], args.out / "reference_val.pt")
    write_text(args.out / "jobs" / f"{result['name']}.json", json.dumps(result, indent=1))
    return result


# evaluation --------------------------------------------------------------------------------
def encode_split(ckpt: Path, rows: list[dict]):
    """(tokenizer, [(prompt ids, answer ids)]) in the checkpoint's own template, as sft.py encodes them."""
    from finetune.checkpoints import load_start
    from finetune.hf_chat import chat_encoder

    _, tok, template = load_start(ckpt, kernels="torch", weights=False)
    enc = chat_encoder(tok, template)
    encoded = [enc.encode_example(r["prompt"], r["messages"][1]["content"], MAX_LEN) for r in rows]
    return tok, encoded


def answer_logps(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """Summed log-probs of each answer after its prompt."""
    import torch

    from finetune.chat import IGNORE_INDEX, pad_right, sft_row
    from finetune.losses import sequence_logps

    out = []
    for start in range(0, len(prompts), 100):
        rows = [sft_row(p, a) for p, a in zip(prompts[start:start + 100], answers[start:start + 100])]
        ids = torch.tensor(pad_right([r[0] for r in rows], pad_id))
        labels = torch.tensor(pad_right([r[1] for r in rows], IGNORE_INDEX))
        out += sequence_logps(model(ids), labels).tolist()
    return out


def decode_answers(model, prompts, tok, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Each prompt's answer ids: greedy at temperature 0, else sampled (seeded)."""
    import torch

    from finetune.generate import generate_batch

    generator = torch.Generator().manual_seed(seed)
    answers = []
    for start in range(0, len(prompts), 100):
        answers += generate_batch(model, prompts[start:start + 100], MAX_NEW_TOKENS, tok.eos_id, tok.pad_id,
                                  temperature=temperature, generator=generator)
    return answers


def make_reference(args, theta0: Path, split: str) -> None:
    """θ0's own answers y' to the split's prompts and θ0's log-probs of y and y' (the margin's baseline)."""
    import torch

    from model import Llama

    path = args.out / f"reference_{split}.pt"
    if path.is_file():
        return
    rows = [json.loads(line) for line in (args.out / f"{split}.jsonl").read_text().splitlines()]
    tok, encoded = encode_split(theta0, rows)
    prompts, real = [p for p, _ in encoded], [a for _, a in encoded]
    with torch.no_grad():
        model = Llama.load(theta0, kernels="torch").eval()
        generated = decode_answers(model, prompts, tok, args.temperature, args.data_seed)
        ref_real = answer_logps(model, prompts, real, tok.pad_id)
        ref_generated = answer_logps(model, prompts, generated, tok.pad_id)
    torch.save({"split": split, "prompts": prompts, "real": real, "generated": generated,
                "valid": [r["valid"] for r in rows],
                "ref_real": ref_real, "ref_generated": ref_generated}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def evaluate(ckpt: Path, reference_file: Path) -> dict:
    """The three held-out measures (module docstring, step 4) of one model on one split."""
    import torch

    from data_prep.tokenizer import load_tokenizer
    from model import Llama

    ref = torch.load(reference_file)
    tok = load_tokenizer(ckpt)
    with torch.no_grad():
        model = Llama.load(ckpt, kernels="torch").eval()
        real = answer_logps(model, ref["prompts"], ref["real"], tok.pad_id)
        generated = answer_logps(model, ref["prompts"], ref["generated"], tok.pad_id)
        answers = decode_answers(model, ref["prompts"], tok)
    n_tokens = sum(len(a) for a in ref["real"])
    margins = [(lr - rr) - (lg - rg) for lr, rr, lg, rg, y, y2 in
               zip(real, ref["ref_real"], generated, ref["ref_generated"], ref["real"], ref["generated"]) if y != y2]
    exact = sum(tok.decode(a).strip() in valid for a, valid in zip(answers, ref["valid"]))
    return {"ll_per_token": sum(real) / n_tokens, "exact_match": exact / len(answers),
            "margin": statistics.fmean(margins) if margins else 0.0,
            "margin_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else 0.0,
            "margin_rows": len(margins),
            "stops_with_eos": sum(bool(a) and a[-1] == tok.eos_id for a in answers) / len(answers)}


# summary -----------------------------------------------------------------------------------
def setting(run: dict) -> str:
    return f"SFT lr {run['lr']:g}" if run["arm"] == "sft" else f"SPIN lr {run['lr']:g} β {run['beta']:g}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], k: int) -> dict:
    """{setting: {"arm", "seeds", "points": [{"k", split: {metric: (mean, std over seeds)}}]}}
    (val only in the last point)."""
    grouped: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["arm"], r["lr"], r["beta"] or 0, r["seed"])):
        grouped.setdefault(setting(run), []).append(run)
    return {name: {"arm": group[0]["arm"], "seeds": [r["seed"] for r in group],
                   "points": [{"k": j, **{split: {m: mean_std([r["points"][j - 1][split][m] for r in group])
                                                  for m in METRICS}
                                          for split in ("val", "test") if split in group[0]["points"][j - 1]}}
                              for j in range(1, k + 1)]}
            for name, group in grouped.items()}


def pick(table: dict, arm: str) -> str:
    """The arm's setting with the best val exact match after k, then the best val log-likelihood."""
    return max((name for name, e in table.items() if e["arm"] == arm),
               key=lambda name: (table[name]["points"][-1]["val"]["exact_match"][0],
                                 table[name]["points"][-1]["val"]["ll_per_token"][0]))


def fmt(pair: tuple[float, float], digits: int = 3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def report(args, plateau: dict, theta0: dict, table: dict, picks: dict, runs: list[dict], seconds: float) -> str:
    curve = plateau["val_loss"]
    lines = [f"SFT at a constant lr {args.sft_lr:g}, val loss per epoch: " + ", ".join(f"{v:.4f}" for v in curve[1:]),
             f"Lowest after epoch {plateau['theta0_epoch']} of {args.sft_epochs} ({curve[plateau['theta0_epoch']]:.4f}; "
             f"plateau {'reached' if plateau['reached'] else 'NOT reached'}). " + (
                 f"θ0 = SFT for {plateau['theta0_epoch']} epochs with a cosine decay: val loss "
                 f"{plateau['theta0_val_loss']:.4f}." if plateau["theta0"] == "annealed" else
                 "θ0 = that epoch's checkpoint (--theta0 plateau)."), "",
             f"Test set ({args.test_rows} rows), mean ± std over seeds {', '.join(map(str, args.seeds))}; "
             f"* = the arm's pick on val. θ0: log-lik/token {theta0['test']['ll_per_token']:.4f}, "
             f"exact match {theta0['test']['exact_match']:.3f}, margin 0 by definition.", "",
             "| setting | k | log-lik / answer token | exact match | margin (nats) | margin > 0 |",
             "|---|---|---|---|---|---|",
             f"| θ0 | 0 | {theta0['test']['ll_per_token']:.4f} | {theta0['test']['exact_match']:.3f} | 0 | - |"]
    for name, entry in table.items():
        mark = " *" if name in picks.values() else ""
        for point in entry["points"]:
            t = point["test"]
            lines.append(f"| {name}{mark} | {point['k']} | {fmt(t['ll_per_token'], 4)} | {fmt(t['exact_match'])} | "
                         f"{fmt(t['margin'], 2)} | {fmt(t['margin_accuracy'])} |")
    spin_runs = [r for r in runs if r["arm"] == "spin"]
    if spin_runs:
        lines += ["", f"SPIN on its training pairs (iteration {args.k - 1}) vs on test prompts (after it):", "",
                  "| setting | train reward accuracy | train margin (nats) | test margin > 0 | test margin (nats) |",
                  "|---|---|---|---|---|"]
        for name, entry in table.items():
            mine = [r for r in spin_runs if setting(r) == name]
            if mine:
                t = entry["points"][-1]["test"]
                lines.append(f"| {name} | {fmt(mean_std([r['train_last_iteration']['accuracy'] for r in mine]))} | "
                             f"{fmt(mean_std([r['train_last_iteration']['margin'] for r in mine]), 2)} | "
                             f"{fmt(t['margin_accuracy'])} | {fmt(t['margin'], 2)} |")
        lines.append("")
        for t in range(args.k):
            stats = [r["pairs"][t] for r in spin_runs]
            lines.append(f"SPIN iteration {t}: pairs kept {mean_std([s['pairs'] for s in stats])[0]:.0f} of "
                         f"{args.spin_prompts} on average (identical to the real answer: "
                         f"{mean_std([s['dropped_identical'] for s in stats])[0]:.0f} dropped), over {len(stats)} runs")
    lines.append(f"\n{len(runs)} training runs, {seconds / 60:.1f} min with {args.workers} worker(s)")
    return "\n".join(lines)


def plot(path: Path, plateau: dict, theta0: dict, table: dict, picks: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")     # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    curve = plateau["val_loss"]
    axes[0].plot(range(1, len(curve)), curve[1:], marker=".")
    axes[0].plot([plateau["theta0_epoch"]], [plateau["theta0_val_loss"]], marker="*", markersize=12,
                 linestyle="none", label=f"θ0 ({plateau['theta0']})")
    axes[0].axvline(plateau["theta0_epoch"], color="grey", linestyle="--")
    axes[0].set(title="SFT at a constant lr: val loss / answer token", xlabel="epoch", yscale="log")
    axes[0].legend()
    panels = [("ll_per_token", "test log-lik / answer token"), ("exact_match", "test exact match"),
              ("margin", "test margin vs θ0 (nats)")]
    for ax, (metric, title) in zip(axes[1:], panels):
        for name, entry in table.items():
            base = theta0["test"][metric] if metric != "margin" else 0.0
            ks = [0] + [p["k"] for p in entry["points"]]
            means = [base] + [p["test"][metric][0] for p in entry["points"]]
            stds = [0.0] + [p["test"][metric][1] for p in entry["points"]]
            picked = name in picks.values()
            ax.errorbar(ks, means, yerr=stds, marker="o" if picked else ".", capsize=3,
                        linewidth=2.2 if picked else 0.8, alpha=1.0 if picked else 0.5,
                        linestyle="-" if entry["arm"] == "spin" else "--",
                        label=name + (" (pick)" if picked else ""))
        ax.set(title=title, xlabel="k (SFT epochs / SPIN iterations) after θ0")
        if metric == "ll_per_token":
            # Settings that wreck the model would squash the rest into a line: they are cut off
            # (their numbers are in results.md).
            base = theta0["test"][metric]
            ax.set_ylim(bottom=max(ax.get_ylim()[0], base - 0.25))
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_same_study(args) -> None:
    """A re-run reuses OUT's finished runs, so it must be the same study: other settings are refused."""
    path = args.out / "study_args.json"
    mine = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "workers")}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in mine.keys() | before.keys() if mine.get(k) != before.get(k))
        if changed:
            raise SystemExit(f"error: {path} holds a study with other settings ("
                             + ", ".join(f"--{k.replace('_', '-')} {before.get(k)} -> {mine.get(k)}" for k in changed)
                             + "); use another --out")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    check_same_study(args)
    (args.out / "jobs").mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    rows = make_rows(args)
    for split, split_rows in rows.items():
        write_jsonl(args.out / f"{split}.jsonl", split_rows)
    base = make_base(args, rows["train"])
    print(f"1/4 SFT from a random model for {args.sft_epochs} epochs ({args.train_rows} rows)", flush=True)
    theta0, plateau = sft_plateau(args, base)
    print(f"    plateau after epoch {plateau['theta0_epoch']} (val loss {plateau['val_loss'][plateau['theta0_epoch']]:.4f}); "
          f"θ0 ({args.theta0}) val loss {plateau['theta0_val_loss']:.4f}", flush=True)
    for split in ("val", "test"):
        make_reference(args, theta0, split)
    theta0_scores = {split: evaluate(theta0, args.out / f"reference_{split}.pt") for split in ("val", "test")}

    jobs = [("spin", lr, beta, seed) for lr in args.spin_lrs for beta in args.betas for seed in args.seeds]
    jobs += [("sft", lr, seed) for lr in args.more_sft_lrs for seed in args.seeds]
    runs, todo = [], []
    for job in jobs:
        done = args.out / "jobs" / f"{job_name(job)}.json"
        (runs.append(json.loads(done.read_text())) if done.is_file() else todo.append(job))
    print(f"2/4 {len(jobs)} runs from θ0 ({len(jobs) - len(todo)} already done), {args.workers} at a time", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, args, theta0, job): job for job in todo}
        for n, future in enumerate(as_completed(futures), start=1):
            run = future.result()
            runs.append(run)
            last = run["points"][-1]["val"]
            print(f"    [{n}/{len(todo)}] {run['name']}: val exact match {last['exact_match']:.3f}, "
                  f"log-lik {last['ll_per_token']:.4f}, margin {last['margin']:.2f} "
                  f"({(time.time() - t0) / 60:.1f} min)", flush=True)

    print("3/4 summary", flush=True)
    table = summarize(runs, args.k)
    picks = {arm: pick(table, arm) for arm in ("sft", "spin")}
    seconds = time.time() - t0
    text = report(args, plateau, theta0_scores, table, picks, runs, seconds)
    print(text, flush=True)
    (args.out / "results.md").write_text(text + "\n")
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "plateau": plateau, "theta0": theta0_scores, "settings": table, "picks": picks,
               "runs": sorted(runs, key=lambda r: r["name"]), "seconds": seconds}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("4/4 plot", flush=True)
    plot(args.out / "study.png", plateau, theta0_scores, table, picks)
    print(f"wrote {args.out / 'results.md'}, results.json and study.png ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
