"""SPIN: Self-Play fIne-tuNing (Chen et al. 2024, arXiv 2401.01335), end to end and resumable.

    python finetune/spin.py --ckpt SFT_DIR/final --data CHAT/train.jsonl --out SPIN_DIR \
        [--iterations 4] [--num-prompts 50000] [--max-new-tokens 256] ...
    python finetune/spin.py --ckpt SFT_DIR/final --pairs SPIN_iter0/train.parquet --out SPIN_DIR ...
    fabric run finetune/spin.py ...   (several GPUs: generation/reference log-probs per rank, FSDP2 training)

Iteration t (θ0 = --ckpt, θt = SPIN_DIR/iter{t}):
  1. generate   θt answers N prompts ("generated"; a random sample seeded by --seed), batched
                KV-cache decoding; with --pairs, iteration 0 takes the file's answers instead
  2. pairs      (prompt, real answer, generated answer); pairs whose generation equals the real
                answer or has no token are dropped and counted (an answer that is EOS alone is kept);
                a generation cut off by --max-new-tokens is kept, ended with EOS or dropped
                (--capped-generations), and counted
  3. ref logps  log πθt(real|x), log πθt(generated|x) computed once and stored, so no second
                model is in memory while training; training data = this iteration's pairs +
                the previous iteration's (from t = 1 on, as the paper)
  4. train      θ from θt with spin_loss (DPO sigmoid loss, chosen = real, rejected = generated,
                reference = θt); RMSprop, no weight decay, linear warmup 10% then linear decay
                over --schedule-epochs; training stops after --epochs (or --max-steps); or exactly
                --iteration-steps steps; --warmup-steps in steps; --carry-optimizer-state starts
                from the optimizer state iteration t-1 ended with (docs/spin.md: Recipe options)
  5. save       θt+1 -> SPIN_DIR/iter{t+1} (the epochs before the last: iter{t+1}/epoch{k}), then
                state.json records the iteration as complete

Output layout:
    SPIN_DIR/state.json                         {"completed_iterations": k, "global_step": s}; written last
                                                per iteration
    SPIN_DIR/config.yaml                        resolved options and backends (--run-config resumes from it)
    SPIN_DIR/run_args.json                      flags that shape the stages, and the chat template's
                                                fingerprint; resuming with others is an error
    SPIN_DIR/metrics.jsonl                      per step: loss, rewards/*, logps/*, lr; every line has "iteration";
                                                one step counts on across iterations and restarts
    SPIN_DIR/iter{t}/                           consolidated θt + θ0's tokenizer files and chat template
    SPIN_DIR/work/iter{t}/generations.rank{r}.jsonl   incremental, keyed by prompt "index"
    SPIN_DIR/work/iter{t}/generations.jsonl     all ranks merged in prompt order (stage 1 done)
    SPIN_DIR/work/iter{t}/pairs.jsonl           the kept pairs, + pairs_stats.json (stage 2 done)
    SPIN_DIR/work/iter{t}/ref_logps.pt          reference log-probs of the training set (stage 3 done)

Re-running the same command after a crash continues from the last completed stage; an
interrupted generation resumes at the first prompt index not yet written, with no duplicates.
An interrupted training stage restarts that iteration's training from θt.

Prompts and answers are laid out in θ0's chat template: ours, or the HF Jinja template --ckpt
brings (a chat model such as zephyr; finetune/hf_chat.py); every iter{t} carries it on.

Defaults are the paper's settings (zephyr-7b: lr 5e-7 for iterations 0-1 then 1e-7, β 0.1,
RMSprop, global batch 64, warmup 10%, 4 iterations; epochs/max length from the reference
code's config), each a flag. Sizes meant for a 7B model on 8 GPUs are far too big for a CPU:
pass small values there.

Limitation: generation and reference log-probs run on each rank with a full (unsharded) copy
of θt, which is fine up to a few billion parameters per GPU; training is sharded with FSDP2.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.batching import check_batch_sizes, epoch_batches, rank_micro_batches
from finetune.chat import IGNORE_INDEX, TruncationStats, pad_right, read_chat, sft_row
from finetune.checkpoints import load_start, save_finetuned
from finetune.hf_chat import chat_encoder
from finetune.optimizer_state import load_optimizer_state, save_optimizer_state
from finetune.options import FinetuneOptions
from finetune.spin_data import read_pairs, reindex, sample_rows
from finetune.generate import generate_to_file, merge_generation_files, rank_slice, read_jsonl_rows
from finetune.losses import sequence_logps, spin_loss
from model.atomic import write_json, write_jsonl, write_torch
from pretrain.checkpoint import load_model_from_any
from pretrain.engine import (Engine, Throughput, TrainingError, build_optimizer, memory_metrics,
                             mfu_metrics, print_run_description, run_description, setup_fabric)
from pretrain.metrics import MetricsLogger, peak_flops_per_second
from pretrain.options import as_dict, opt, parse_options, script_name, write_run_config
from pretrain.schedule import SHAPES, lr_at, warmup_steps_from_ratio
from pretrain.sharded_load import load_sharded

__all__ = ["spin_loss", "main"]

STATE_FILE = "state.json"
RUN_ARGS_FILE = "run_args.json"
# Flags that change what the stored stages contain: a resumed run must use the same values.
# β is not one: no stored stage depends on it, so a resumed run may change it for iterations not yet trained.
STAGE_FLAGS = ("ckpt", "data", "pairs", "tokenizer", "num_prompts", "max_new_tokens", "max_prompt_len", "max_len",
               "temperature", "top_p", "seed", "no_previous_pairs", "capped_generations")
CAPPED = ("keep", "eos", "drop")  # what becomes of a generation that reached --max-new-tokens without stopping
OPTIMIZER_STATE = "optimizer_state"  # work/iter{t}/optimizer_state: the state after iteration t's training
TEMPLATE_KEY = "chat_template"  # run_args.json also records the chat template's fingerprint


@dataclass(kw_only=True)
class SpinOptions(FinetuneOptions):
    """Every option of finetune/spin.py (the shared ones: finetune/options.py, pretrain/engine.py)."""

    data: Path | None = opt(None, "UltraChat-format .jsonl or .parquet (not needed with --pairs)")
    pairs: Path | None = opt(None, "train iteration 0 on these pairs instead of generating: SPIN's released "
                                   "data layout (UCLA-AGI/SPIN_iter0), rows {real, generated} of messages; "
                                   ".jsonl or .parquet; later iterations answer the same prompts")
    iterations: int = opt(4, "SPIN iterations", minimum=1)
    num_prompts: int = opt(50000, "a random sample of N rows of --data/--pairs, seeded by --seed", minimum=1)
    # generation
    # The three lengths default to the paper's 256/512/1024, cut to fit the model's context (fit_lengths).
    max_new_tokens: int | None = opt(None, "tokens generated per answer (default: 256, or what the context "
                                           "leaves after --max-prompt-len)", minimum=1)
    max_prompt_len: int | None = opt(None, "prompts keep their last tokens (default: 512, at most half of "
                                           "--max-len)", minimum=1)
    max_len: int | None = opt(None, "prompt + answer tokens in training (default: 1024, at most the model's "
                                    "context)", minimum=2)
    gen_batch_size: int = opt(16, "prompts per generation batch", minimum=1)
    temperature: float = opt(1.0, "sampling temperature: 1 samples y' ~ πθt as SPIN's theory assumes; 0 = greedy "
                                  "(docs/spin.md: Generation settings)", minimum=0)
    top_p: float = opt(1.0, "nucleus sampling mass", minimum=0)
    capped_generations: str = opt("keep", "a generation that reached --max-new-tokens without a stop token: keep "
                                          "it as it is, end it with the end-of-turn token (eos), or drop its pair; "
                                          "counted either way (pairs_stats.json)", choices=CAPPED)
    # training
    beta: list[float] = opt([0.1], "SPIN/DPO temperature β: one value for every iteration, or one per "
                                   "iteration, comma-separated (the paper: 0.1,0.1,0.1,5.0)", metavar="B[,B...]")
    lr: float = opt(5e-7, "learning rate of the first iterations", minimum=0)
    lr_later: float = opt(1e-7, "learning rate from --lr-drop-iteration on", minimum=0)
    lr_drop_iteration: int = opt(2, "first iteration trained with --lr-later", minimum=0)
    lr_schedule: str = opt("linear", "decay after the warmup", choices=SHAPES)
    warmup_ratio: float = opt(0.1, "linear warmup over this share of each iteration's schedule", minimum=0)
    warmup_steps: int | None = opt(None, "linear warmup over this many optimizer steps of each iteration (replaces "
                                         "--warmup-ratio; more steps than an iteration runs is an error)", minimum=0)
    optimizer: str = opt("rmsprop", "the paper uses RMSprop (no bias correction: a fresh one overshoots at first; "
                                    "see --carry-optimizer-state)", choices=["rmsprop", "adamw"])
    carry_optimizer_state: bool = opt(False, "iteration t+1 starts from the optimizer state iteration t ended with "
                                             "(saved as work/iter{t}/optimizer_state) instead of a fresh optimizer")
    weight_decay: float = opt(0.0, "weight decay of the matrices", minimum=0)
    # The reference decays the lr over 6 epochs and stops after 2 (its model cards): the decay's
    # length and the stopping point are two flags.
    schedule_epochs: int = opt(6, "the warmup and decay span this many epochs of each iteration", minimum=1)
    epochs: int = opt(2, "training stops after this many epochs of each iteration (<= --schedule-epochs); "
                         "the epochs before the last are saved as SPIN_DIR/iter{t+1}/epoch{k}", minimum=1)
    max_steps: int | None = opt(None, "stop each iteration after this many optimizer steps (the schedule "
                                      "keeps its length)")
    iteration_steps: int | None = opt(None, "every iteration runs exactly this many optimizer steps, going over its "
                                            "pairs as many times as needed, with the warmup and decay over them "
                                            "(replaces --epochs and --schedule-epochs; matches arms in steps)",
                                      minimum=1)
    global_batch_size: int = opt(64, "pairs per optimizer step, all ranks", minimum=1)
    micro_batch_size: int = opt(8, "pairs per forward (2x rows)", minimum=1)
    no_previous_pairs: bool = opt(False, "train on this iteration's pairs only (the paper also keeps the "
                                         "previous iteration's)")
    seed: int = opt(42, "seeds generation and the data order")
    no_progress: bool = opt(False, "no progress bars")

    def problems(self) -> list[str]:
        problems = [f"--top-p must be in (0, 1], got {self.top_p}"] if not 0 < self.top_p <= 1 else []
        if (self.data is None) == (self.pairs is None):
            problems.append("give --data (prompts and real answers; θ0 generates) or --pairs (given pairs), "
                            "not both" if self.data is not None else "one of --data or --pairs is required")
        if self.max_prompt_len is not None and self.max_len is not None and self.max_prompt_len >= self.max_len:
            problems.append(f"--max-prompt-len {self.max_prompt_len} must be below --max-len {self.max_len}: "
                            f"a training row needs room for the answer after the prompt")
        if self.epochs > self.schedule_epochs:
            problems.append(f"--epochs {self.epochs} is beyond --schedule-epochs {self.schedule_epochs}: the "
                            f"learning rate would be 0 after the decay; raise --schedule-epochs")
        if self.iteration_steps is not None and self.max_steps is not None:
            problems.append("give --iteration-steps (each iteration's length and schedule) or --max-steps (a stop "
                            "within the epochs' schedule), not both")
        if self.iteration_steps is not None and self.warmup_steps is not None \
                and self.warmup_steps > self.iteration_steps:
            problems.append(f"--warmup-steps {self.warmup_steps} is beyond --iteration-steps {self.iteration_steps}: "
                            f"the lr would never reach --lr; lower --warmup-steps")
        if len(self.beta) not in (1, self.iterations):
            problems.append(f"--beta has {len(self.beta)} values but --iterations is {self.iterations}; give one value "
                            f"(every iteration) or one per iteration")
        if any(b <= 0 for b in self.beta):
            problems.append(f"--beta must be positive, got {','.join(map(str, self.beta))}")
        return problems

    def beta_at(self, t: int) -> float:
        """β of iteration t (0-based)."""
        return self.beta[t] if len(self.beta) > 1 else self.beta[0]


def parse_args(argv=None) -> SpinOptions:
    return parse_options(SpinOptions, argv, description=__doc__.split("\n\n")[0],
                         epilog="Every run writes its resolved options to OUT/config.yaml; re-running the same "
                                "command (or `python finetune/spin.py --run-config OUT/config.yaml`) resumes it.")


def fit_lengths(args: SpinOptions, context: int) -> None:
    """Fill in the lengths not given: the paper's 1024/512/256, cut to the model's context
    (a 128-token model gets 128/64/64), then check them against it. Writes into `args`, so
    config.yaml and run_args.json hold the lengths the run used."""
    if args.max_len is None:
        args.max_len = min(1024, context)
    if args.max_prompt_len is None:
        args.max_prompt_len = min(512, args.max_len // 2)
    if args.max_new_tokens is None:
        args.max_new_tokens = max(1, min(256, context - args.max_prompt_len))
    if args.max_prompt_len >= args.max_len:
        raise ValueError(f"--max-prompt-len {args.max_prompt_len} must be below --max-len {args.max_len}: "
                         f"a training row needs room for the answer after the prompt")
    if args.max_prompt_len + args.max_new_tokens > context:
        raise ValueError(f"--max-prompt-len {args.max_prompt_len} + --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's context ({context})")
    if args.max_len > context:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context ({context})")


@dataclass(frozen=True)
class IterationPlan:
    """One iteration's training length, in optimizer steps."""
    batch: int            # pairs per optimizer step (the global batch, lowered when there are fewer pairs)
    per_epoch: int        # steps per pass over the pairs
    total: int            # steps the iteration runs
    schedule_total: int   # steps the warmup + decay span (>= total)
    warmup: int           # warmup steps (<= total)


def iteration_plan(args: SpinOptions, n_pairs: int, world: int, t: int) -> IterationPlan:
    """How long iteration t trains on `n_pairs` pairs: epochs of the pairs (--epochs of a
    --schedule-epochs schedule, maybe stopped at --max-steps) or exactly --iteration-steps.
    A warmup longer than the steps run is refused: the lr would never reach its peak."""
    batch = min(args.global_batch_size, n_pairs // (args.micro_batch_size * world)
                * args.micro_batch_size * world) or args.global_batch_size
    check_batch_sizes(batch, args.micro_batch_size, world)
    per_epoch = len(epoch_batches(n_pairs, batch, args.seed + t, 0))
    if args.iteration_steps is not None:
        total = schedule_total = args.iteration_steps
    else:
        schedule_total = per_epoch * args.schedule_epochs  # the lr schedule's length...
        total = min(per_epoch * args.epochs, args.max_steps or per_epoch * args.epochs)  # ...and where we stop
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
        if warmup > total:
            raise ValueError(f"--warmup-steps {warmup} is beyond the {total} optimizer steps iteration {t} runs "
                             f"({n_pairs} pairs, {batch} per step); lower --warmup-steps or give --iteration-steps")
    else:
        warmup = warmup_steps_from_ratio(args.warmup_ratio, schedule_total)
    return IterationPlan(batch=batch, per_epoch=per_epoch, total=total, schedule_total=schedule_total, warmup=warmup)


# ---- small file helpers --------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]




def read_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"completed_iterations": 0}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); it is written atomically, so it was edited by hand") from e


# ---- the stages ----------------------------------------------------------------------------
class SpinRun:
    def __init__(self, args: SpinOptions):
        self.args = args
        # An unsupported or unreadable --ckpt, a tokenizer that does not fit its embedding and a
        # template that cannot be split are refused before any process or file is made.
        # θ0's tokenizer and template are used for every iteration (each iter{t} keeps copies).
        # Only θ0's config is needed here: the model comes back on the meta device, nothing read.
        model, self.tok, self.template = load_start(args.ckpt, args.tokenizer, args.kernels, weights=False)
        self.config = model.config
        del model
        # --ckpt's own template: an HF directory's Jinja template when it has one (finetune/hf_chat.py).
        self.encoder = chat_encoder(self.tok, self.template)
        self.fabric = setup_fabric(args, activation_checkpointing=args.activation_checkpointing, seed=args.seed)
        self.rank, self.world = self.fabric.global_rank, self.fabric.world_size
        fit_lengths(args, self.config.block_size)
        self.fabric.print(f"chat template: {self.template.describe()}")
        # Given answers (--pairs) stand in for θ0's generations; both sources are sampled alike.
        if args.pairs is not None:
            examples, given = read_pairs(args.pairs)
        else:
            examples, given = read_chat(args.data), None
        rows = sample_rows(len(examples), args.num_prompts, args.seed)
        self.examples = reindex(examples, rows)
        self.given = None if given is None else [self.encoder.answer_ids(examples[r].prompt, given[r]) for r in rows]
        self.prompts = [self.encoder.prompt_ids(ex.prompt, args.max_prompt_len) for ex in self.examples]
        self.prompts_truncated = self.encoder.stats.prompts_truncated
        self.logger: MetricsLogger | None = None  # opened by run(), after restore_metrics_step
        self.peak_flops = peak_flops_per_second(self.fabric.device)
        self.global_step = 0
        # Generation/reference run in the training precision's compute dtype (bf16 on GPUs by default).
        precision = getattr(self.fabric, "train_precision", None) or args.precision or ""
        self.gen_dtype = torch.bfloat16 if str(precision).startswith("bf16") else None

    def check_run_args(self) -> None:
        """Refuse to resume an output directory made with different stage-defining flags."""
        path = self.args.out / RUN_ARGS_FILE
        now = {k: str(getattr(self.args, k)) for k in STAGE_FLAGS}
        # The template comes from --ckpt's files, which may be edited between runs: it shapes every stage too.
        now[TEMPLATE_KEY] = self.template.fingerprint()
        if path.is_file():
            before = json.loads(path.read_text())
            changed = [k for k in now if k in before and before[k] != now[k]]
            if changed:
                k = changed[0]
                if k == TEMPLATE_KEY:
                    raise ValueError(f"{path}: the chat template was {before[k]} when this directory was started, "
                                     f"now {now[k]} ({self.template.describe()}); resume with the template the "
                                     f"run started with, or use a new --out")
                raise ValueError(f"{path}: --{k.replace('_', '-')} was {before[k]} when this directory was started, "
                                 f"now {now[k]}; use the same flags to resume, or a new --out")
        elif self.rank == 0:
            self.args.out.mkdir(parents=True, exist_ok=True)
            write_json(path, now)
        self.fabric.barrier()

    # θt: --ckpt for t = 0, else our own iter{t}
    def model_dir(self, t: int) -> Path:
        return self.args.ckpt if t == 0 else self.args.out / f"iter{t}"

    def work_dir(self, t: int) -> Path:
        return self.args.out / "work" / f"iter{t}"

    def load_eval_model(self, t: int):
        model = load_model_from_any(self.model_dir(t), kernels=self.args.kernels)
        if self.gen_dtype is not None:
            model = model.to(self.gen_dtype)
        return model.to(self.fabric.device).eval()

    def restore_metrics_step(self, state: dict, done: int) -> None:
        """Continue the one metrics step where the completed iterations left it, and drop the rows
        an interrupted training stage wrote (its iteration is re-trained from θt, and logs again).

        Rows of iteration `done` at or before that step (generation, pairs: stages that stay
        done) are kept, so metrics.jsonl has no duplicates and its steps never go backwards.
        """
        path = self.args.out / "metrics.jsonl"
        # Only rank 0 logs, so only it reads (and mends a torn last line of) the file.
        rows = read_jsonl_rows(path) if self.rank == 0 else []
        if "global_step" in state:
            self.global_step = int(state["global_step"])
        else:  # a state.json from before the step was recorded
            self.global_step = max((r["step"] for r in rows if r.get("iteration", 0) < done), default=0)
        kept = [r for r in rows if r.get("iteration", 0) < done or r["step"] <= self.global_step]
        if len(kept) != len(rows):
            write_jsonl(path, kept)
            self.fabric.print(f"{path}: dropped {len(rows) - len(kept)} row(s) of the interrupted iteration {done}")
        self.fabric.barrier()
        self.logger = self.new_logger()

    def new_logger(self) -> MetricsLogger:
        return MetricsLogger(self.args.out, enabled=self.rank == 0, wandb_project=self.args.wandb_project,
                             wandb_mode=self.args.wandb_mode, run_config=as_dict(self.args) | {"stage": "spin"})

    def log(self, t: int, metrics: dict) -> None:
        self.logger.log({"iteration": t, **metrics}, step=self.global_step)

    # 1. generation --------------------------------------------------------------------------
    def generate(self, t: int, model) -> None:
        work = self.work_dir(t)
        final = work / "generations.jsonl"
        if final.is_file():
            return
        work.mkdir(parents=True, exist_ok=True)
        if t == 0 and self.given is not None:
            # --pairs: the file's answers are iteration 0's generations (ids as training will see them).
            if self.rank == 0:
                write_jsonl(final, [{"index": i, "generated_ids": ids, "stopped": True, "given": True}
                                    for i, ids in enumerate(self.given)])
                self.fabric.print(f"iter0: {len(self.given)} generated answers from {self.args.pairs}")
            self.fabric.barrier()
            return
        mine = rank_slice(len(self.prompts), self.rank, self.world)
        stats = generate_to_file(
            model(), [(i, self.prompts[i]) for i in mine], work / f"generations.rank{self.rank}.jsonl",
            max_new_tokens=self.args.max_new_tokens, eos_id=self.encoder.stop_ids, pad_id=self.tok.pad_id,
            batch_size=self.args.gen_batch_size, temperature=self.args.temperature, top_p=self.args.top_p,
            seed=self.args.seed + 7919 * t, decode=self.tok.decode, desc=f"iter{t} generate",
            disable_progress=self.args.no_progress or self.rank != 0)
        self.fabric.barrier()
        if self.rank == 0:
            parts = [work / f"generations.rank{r}.jsonl" for r in range(self.world)]
            merge_generation_files(parts, final, expected=list(range(len(self.prompts))))
            self.log(t, {"generate/new_rows": stats["new_rows"], "generate/tokens_per_s": stats["tokens_per_s"]})
            self.fabric.print(f"iter{t}: generated {stats['new_rows']} answers this run "
                              f"({stats['tokens_per_s']:.0f} tokens/s on rank 0)")
        self.fabric.barrier()

    # 2. pairs -------------------------------------------------------------------------------
    def build_pairs(self, t: int) -> None:
        work = self.work_dir(t)
        done = (work / "pairs.jsonl").is_file()
        # Every rank looks before rank 0 may write the file: a rank that looked later would skip
        # the barrier below and pair its next collective with the wrong one (a hang).
        self.fabric.barrier()
        if done:
            return
        if self.rank == 0:
            generations = {row["index"]: row for row in _read_jsonl(work / "generations.jsonl")}
            # Counted afresh per iteration (prompt truncations were counted once, when the prompts were
            # encoded): pairs_stats.json is the same whether or not the run was resumed.
            self.encoder.stats = TruncationStats(prompts_truncated=self.prompts_truncated)
            pairs, identical, empty, eos_only, capped_dropped, capped_ended = [], 0, 0, 0, 0, 0
            max_length = sum(1 for row in generations.values() if not row.get("stopped", False))
            policy = self.args.capped_generations
            for ex, prompt in zip(self.examples, self.prompts):
                row = generations[ex.index]
                gen = list(row["generated_ids"])
                if not row.get("stopped", False) and gen:
                    # Cut off by --max-new-tokens: an unfinished answer. Kept as is, it teaches the
                    # model nothing about where answers end; ended, it is a complete (wrong) answer.
                    if policy == "drop":
                        capped_dropped += 1
                        continue
                    if policy == "eos":
                        gen.append(self.encoder.end_of_turn)
                        capped_ended += 1
                real = self.encoder.fit_response(prompt, self.encoder.answer_ids(ex.prompt, ex.response),
                                                 self.args.max_len)
                generated = self.encoder.fit_response(prompt, gen, self.args.max_len)
                if not generated:
                    empty += 1  # nothing to score
                    continue
                if generated == real:
                    identical += 1  # equal answers give a zero loss gradient
                    continue
                # An answer that is a stop token alone is kept: the model must learn not to stop at once.
                eos_only += len(generated) == 1 and generated[0] in self.encoder.stop_ids
                pairs.append({"index": ex.index, "prompt_id": ex.prompt_id, "prompt_ids": prompt,
                              "real_ids": real, "generated_ids": generated})
            stats = {"pairs": len(pairs), "dropped_identical": identical, "dropped_empty": empty,
                     "eos_only_answers": eos_only, "generations_at_max_new_tokens": max_length,
                     "capped_generations": policy, "dropped_capped": capped_dropped,
                     "capped_ended_with_eos": capped_ended,
                     "prompts": len(self.examples), **self.encoder.stats.as_dict()}
            write_json(work / "pairs_stats.json", stats)
            write_jsonl(work / "pairs.jsonl", pairs)  # last: its existence marks the stage done
            self.log(t, {f"pairs/{k}": v for k, v in stats.items()})
            self.fabric.print(f"iter{t}: {stats}")
        self.fabric.barrier()

    def training_pairs(self, t: int) -> list[dict]:
        pairs = _read_jsonl(self.work_dir(t) / "pairs.jsonl")
        for p in pairs:
            p["source_iteration"] = t
        if t > 0 and not self.args.no_previous_pairs:
            previous = _read_jsonl(self.work_dir(t - 1) / "pairs.jsonl")
            for p in previous:
                p["source_iteration"] = t - 1
            pairs += previous
        if not pairs:
            raise ValueError(f"{self.work_dir(t) / 'pairs.jsonl'}: no pairs to train on (every generation "
                             f"was equal to its real answer, empty, or capped and dropped); see pairs_stats.json")
        return pairs

    # 3. reference log-probs -----------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, t: int, model, pairs: list[dict]) -> None:
        work = self.work_dir(t)
        final = work / "ref_logps.pt"
        if final.is_file():
            return
        mine = list(rank_slice(len(pairs), self.rank, self.world))
        net = model()
        real, generated = torch.zeros(len(mine)), torch.zeros(len(mine))
        bs = self.args.micro_batch_size
        for start in tqdm(range(0, len(mine), bs), desc=f"iter{t} reference logps",
                          disable=self.args.no_progress or self.rank != 0):
            chunk = [pairs[i] for i in mine[start:start + bs]]
            r, g = self.policy_logps(net, chunk)
            real[start:start + len(chunk)], generated[start:start + len(chunk)] = r.float().cpu(), g.float().cpu()
        write_torch(work / f"ref_logps.rank{self.rank}.pt",
                      {"keys": [(pairs[i]["source_iteration"], pairs[i]["index"]) for i in mine],
                       "real": real, "generated": generated})
        self.fabric.barrier()
        if self.rank == 0:
            parts = [torch.load(work / f"ref_logps.rank{r}.pt") for r in range(self.world)]
            merged = {"keys": [k for p in parts for k in p["keys"]],
                      "real": torch.cat([p["real"] for p in parts]),
                      "generated": torch.cat([p["generated"] for p in parts])}
            write_torch(final, merged)
        self.fabric.barrier()

    @staticmethod
    def padded_len(chunk: list[dict]) -> int:
        """Length of the padded rows `policy_logps` builds for `chunk` (from the host lists)."""
        return max(len(sft_row(p["prompt_ids"], ids)[0]) for p in chunk for ids in (p["real_ids"], p["generated_ids"]))

    def policy_logps(self, model, chunk: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of the real and generated answers, one forward of 2x rows.

        Right padding: with causal attention the padded tail cannot affect earlier positions,
        and its labels are -100, so no attention mask is needed.
        """
        rows = [sft_row(p["prompt_ids"], p["real_ids"]) for p in chunk] + \
               [sft_row(p["prompt_ids"], p["generated_ids"]) for p in chunk]
        ids = torch.tensor(pad_right([r[0] for r in rows], self.tok.pad_id), device=self.fabric.device)
        labels = torch.tensor(pad_right([r[1] for r in rows], IGNORE_INDEX), device=self.fabric.device)
        logps = sequence_logps(model(ids), labels)
        return logps[:len(chunk)], logps[len(chunk):]

    # 4. training ----------------------------------------------------------------------------
    def train(self, t: int, pairs: list[dict]) -> None:
        args, fabric = self.args, self.fabric
        ref = torch.load(self.work_dir(t) / "ref_logps.pt")
        where = {k: i for i, k in enumerate(ref["keys"])}
        ref_real = torch.tensor([float(ref["real"][where[(p["source_iteration"], p["index"])]]) for p in pairs])
        ref_gen = torch.tensor([float(ref["generated"][where[(p["source_iteration"], p["index"])]]) for p in pairs])
        peak_lr = args.lr if t < args.lr_drop_iteration else args.lr_later
        beta = args.beta_at(t)
        plan = iteration_plan(args, len(pairs), self.world, t)
        batch, per_epoch, total = plan.batch, plan.per_epoch, plan.total
        if batch != args.global_batch_size:
            fabric.print(f"iter{t}: only {len(pairs)} pairs, global batch lowered to {batch}")
        fabric.print(f"iter{t}: {total} optimizer steps ({per_epoch} per pass over {len(pairs)} pairs), warmup "
                     f"{plan.warmup}, schedule {plan.schedule_total} steps")

        model = load_sharded(fabric, self.model_dir(t), kernels=args.kernels)  # each rank reads only its shards
        optimizer = build_optimizer(fabric, model, name=args.optimizer, lr=peak_lr, weight_decay=args.weight_decay)
        if args.carry_optimizer_state and t > 0:
            load_optimizer_state(fabric, model, optimizer, self.work_dir(t - 1) / OPTIMIZER_STATE)
            fabric.print(f"iter{t}: optimizer state carried over from iteration {t - 1}")
        resolved = run_description(fabric, model, args.kernels) | {"chat_template": self.template.describe()}
        if t == self.first_iteration:
            if self.rank == 0:
                write_run_config(args.out, script_name(__file__), args, resolved)
            fabric.print(f"sharding: {resolved['sharding']}")
        engine = Engine(fabric, model, optimizer, grad_clip=args.grad_clip, max_skipped_steps=args.max_skipped_steps,
                        stop_hint=f"Stopping; iteration {t} restarts from θ{t} when re-run (lower --lr).")
        meter = Throughput(fabric.device)
        model.train()
        step, saved, epoch = 0, [], 0
        bar = tqdm(total=total, desc=f"iter{t} train", disable=args.no_progress or self.rank != 0)
        while step < total:  # one pass over the pairs ("epoch") per turn
            for global_batch in epoch_batches(len(pairs), batch, args.seed + t, epoch):
                if step >= total:
                    break
                lr = lr_at(step, peak_lr, 0.0, plan.warmup, plan.schedule_total, args.lr_schedule)

                def loss_fn(micro):
                    chunk = [pairs[i] for i in micro]
                    real, gen = self.policy_logps(model, chunk)
                    idx = torch.tensor(micro)
                    loss, m = spin_loss(real, gen, ref_real[idx].to(real.device), ref_gen[idx].to(real.device),
                                        beta)
                    rows = 2 * len(chunk)
                    meter.add(rows * self.padded_len(chunk) * self.world, rows * self.world)
                    # micro-batch mean -> share of the global-batch mean (x world: FSDP averages over ranks)
                    return loss * len(micro) / batch * self.world, {k: v * len(micro) for k, v in m.items()}

                micro_batches = rank_micro_batches(global_batch, self.rank, self.world, args.micro_batch_size)
                result = engine.step(micro_batches, loss_fn, lr, step_number=step + 1)
                engine.settle()  # the bar shows this step's loss anyway, so count its skip now
                step += 1
                self.global_step += 1
                rate = meter.read()
                metrics = {k: v / batch for k, v in result.sums.items()}
                metrics.update(lr=lr, beta=beta, epoch=epoch, grad_norm=result.grad_norm,
                               pairs_per_s=rate["tokens_per_sec"] / max(rate["mean_seq_len"], 1) / 2,
                               tokens_per_sec=rate["tokens_per_sec"],
                               **mfu_metrics(self.config, rate["mean_seq_len"], rate["tokens_per_sec"], self.world,
                                             self.peak_flops),
                               **memory_metrics(fabric.device), skipped_steps=engine.skipped_steps)
                self.log(t, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if args.iteration_steps is None and step == (epoch + 1) * per_epoch and step < total:
                # A completed epoch that is not the last: staged in work/ and moved into iter{t+1}/
                # once that exists (its atomic save replaces the whole directory).
                with meter.paused():
                    save_finetuned(fabric, model, self.work_dir(t) / f"epoch{epoch + 1}", self.tok, self.template)
                saved.append(epoch + 1)
            epoch += 1
        bar.close()
        if args.carry_optimizer_state:
            # Before iter{t+1} exists: a crash in between re-trains iteration t, which writes it again.
            save_optimizer_state(fabric, model, optimizer, self.work_dir(t) / OPTIMIZER_STATE)
        final = save_finetuned(fabric, model, self.model_dir(t + 1), self.tok, self.template)
        if self.rank == 0:
            for k in saved:
                os.replace(self.work_dir(t) / f"epoch{k}", final / f"epoch{k}")
        fabric.barrier()

    # the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        self.check_run_args()
        # Options and backends are on record before generation starts; the first training
        # stage rewrites the file with the measured sharding.
        resolved = run_description(self.fabric, None, args.kernels) | {"chat_template": self.template.describe()}
        if self.rank == 0:
            write_run_config(args.out, script_name(__file__), args, resolved)
        print_run_description(self.fabric, resolved)
        state = read_state(args.out)
        done = int(state.get("completed_iterations", 0))
        if done >= args.iterations:
            self.fabric.print(f"{args.out}: all {args.iterations} iterations already complete")
        if done:
            self.fabric.print(f"resuming after {done} completed iteration(s)")
        self.first_iteration = done
        self.restore_metrics_step(state, done)
        for t in range(done, args.iterations):
            cached = {}

            def model(t=t):
                # θt is loaded lazily: a resumed run that skips generation and reference never needs it.
                if "m" not in cached:
                    cached["m"] = self.load_eval_model(t)
                return cached["m"]

            self.generate(t, model)
            self.build_pairs(t)
            pairs = self.training_pairs(t)
            self.reference_logps(t, model, pairs)
            cached.clear()  # free θt before the policy is built: one model in memory while training
            self.train(t, pairs)
            if self.rank == 0:
                write_json(args.out / STATE_FILE, {"completed_iterations": t + 1, "global_step": self.global_step})
                self.log(t, {"iteration_done": t + 1})
            self.fabric.barrier()
            self.fabric.print(f"saved {self.model_dir(t + 1)}")
        self.logger.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        SpinRun(args).run()
    except (ValueError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
