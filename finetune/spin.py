"""SPIN: Self-Play fIne-tuNing (Chen et al. 2024, arXiv 2401.01335), end to end and resumable.

    python finetune/spin.py --ckpt SFT_DIR/final --data CHAT/train.jsonl --out SPIN_DIR \
        [--iterations 4] [--num-prompts 50000] [--max-new-tokens 256] ...
    fabric run finetune/spin.py ...   (several GPUs: generation/reference log-probs per rank, FSDP2 training)

Iteration t (θ0 = --ckpt, θt = SPIN_DIR/iter{t}):
  1. generate   θt answers the first N prompts ("generated"), batched KV-cache decoding
  2. pairs      (prompt, real answer, generated answer); pairs whose generation equals the real
                answer or is empty are dropped and counted
  3. ref logps  log πθt(real|x), log πθt(generated|x) computed once and stored, so no second
                model is in memory while training; training data = this iteration's pairs +
                the previous iteration's (from t = 1 on, as the paper)
  4. train      θ from θt with spin_loss (DPO sigmoid loss, chosen = real, rejected = generated,
                reference = θt); RMSprop, no weight decay, linear warmup 10% then linear decay
  5. save       θt+1 -> SPIN_DIR/iter{t+1}, then state.json records the iteration as complete

Output layout:
    SPIN_DIR/state.json                         {"completed_iterations": k}; written last per iteration
    SPIN_DIR/run_args.json                      flags that shape the stages; resuming with others is an error
    SPIN_DIR/metrics.jsonl                      per step: loss, rewards/*, logps/*, lr; every line has "iteration"
    SPIN_DIR/iter{t}/                           consolidated θt + tokenizer.model + chat_template.*
    SPIN_DIR/work/iter{t}/generations.rank{r}.jsonl   incremental, keyed by prompt "index"
    SPIN_DIR/work/iter{t}/generations.jsonl     all ranks merged in prompt order (stage 1 done)
    SPIN_DIR/work/iter{t}/pairs.jsonl           the kept pairs, + pairs_stats.json (stage 2 done)
    SPIN_DIR/work/iter{t}/ref_logps.pt          reference log-probs of the training set (stage 3 done)

Re-running the same command after a crash continues from the last completed stage; an
interrupted generation resumes at the first prompt index not yet written, with no duplicates.
An interrupted training stage restarts that iteration's training from θt.

Defaults are the paper's settings (zephyr-7b: lr 5e-7 for iterations 0-1 then 1e-7, β 0.1,
RMSprop, global batch 64, warmup 10%, 4 iterations; epochs/max length from the reference
code's config), each a flag. Sizes meant for a 7B model on 8 GPUs are far too big for a CPU:
pass small values there.

Limitation: generation and reference log-probs run on each rank with a full (unsharded) copy
of θt, which is fine up to a few billion parameters per GPU; training is sharded with FSDP2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.batching import check_batch_sizes, epoch_batches, lr_at, rank_micro_batches
from finetune.chat import IGNORE_INDEX, ChatEncoder, pad_right, read_chat, sft_row
from finetune.checkpoints import load_start, save_finetuned
from finetune.files import write_json, write_jsonl, write_torch
from finetune.generate import generate_to_file, merge_generation_files, rank_slice
from finetune.losses import sequence_logps, spin_loss
from finetune.runtime import (MetricsLogger, build_fabric, clip_grad_norm, load_model_from_any,
                              setup_model)

__all__ = ["spin_loss", "main"]

STATE_FILE = "state.json"
RUN_ARGS_FILE = "run_args.json"
# Flags that change what the stored stages contain: a resumed run must use the same values.
STAGE_FLAGS = ("ckpt", "data", "tokenizer", "num_prompts", "max_new_tokens", "max_prompt_len", "max_len",
               "temperature", "top_p", "seed", "beta", "no_previous_pairs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="the SFT checkpoint θ0")
    p.add_argument("--data", type=Path, required=True, help="UltraChat-format .jsonl or .parquet (SFT data)")
    p.add_argument("--out", type=Path, required=True, help="output directory (re-run to resume)")
    p.add_argument("--tokenizer", type=Path, help="sentencepiece .model; overrides CKPT/tokenizer.model")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=50000, help="first N rows of --data")
    # generation
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-len", type=int, default=512, help="prompts keep their last tokens")
    p.add_argument("--max-len", type=int, default=1024, help="prompt + answer tokens in training")
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    # training
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-7, help="learning rate of the first iterations")
    p.add_argument("--lr-later", type=float, default=1e-7, help="learning rate from --lr-drop-iteration on")
    p.add_argument("--lr-drop-iteration", type=int, default=2)
    p.add_argument("--lr-schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=3, help="epochs per iteration")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per iteration")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward (2x rows)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--no-previous-pairs", action="store_true",
                   help="train on this iteration's pairs only (the paper also keeps the previous iteration's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default=None, help="bf16-mixed or 32-true (default: bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--wandb-project")
    p.add_argument("--wandb-mode", default="offline")
    p.add_argument("--no-progress", action="store_true")
    for action in p._actions:  # show every default in --help, not only of flags with a help text
        if action.help is None:
            action.help = " "
    return p.parse_args(argv)


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
    def __init__(self, args: argparse.Namespace):
        self.args = args
        devices = int(args.devices) if str(args.devices).isdigit() else args.devices
        self.fabric = build_fabric(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                                   precision=args.precision)
        self.fabric.launch()
        self.rank, self.world = self.fabric.global_rank, self.fabric.world_size
        # θ0's tokenizer and template are used for every iteration (each iter{t} keeps copies).
        model, self.tok, self.template = load_start(args.ckpt, args.tokenizer, args.kernels)
        self.config = model.config
        del model
        if args.max_prompt_len + args.max_new_tokens > self.config.block_size:
            raise ValueError(f"--max-prompt-len {args.max_prompt_len} + --max-new-tokens {args.max_new_tokens} "
                             f"exceeds the model's context ({self.config.block_size})")
        if args.max_len > self.config.block_size:
            raise ValueError(f"--max-len {args.max_len} exceeds the model's context ({self.config.block_size})")
        self.encoder = ChatEncoder(self.tok, self.template)
        self.examples = read_chat(args.data, limit=args.num_prompts)
        self.prompts = [self.encoder.prompt_ids(ex.prompt, args.max_prompt_len) for ex in self.examples]
        self.logger = MetricsLogger(args.out, enabled=self.rank == 0, wandb_project=args.wandb_project,
                                    wandb_mode=args.wandb_mode, run_config=vars(args) | {"stage": "spin"})
        self.global_step = 0
        # Generation/reference run in the training precision's compute dtype (bf16 on GPUs by default).
        precision = getattr(self.fabric, "train_precision", None) or args.precision or ""
        self.gen_dtype = torch.bfloat16 if str(precision).startswith("bf16") else None

    def check_run_args(self) -> None:
        """Refuse to resume an output directory made with different stage-defining flags."""
        path = self.args.out / RUN_ARGS_FILE
        now = {k: str(getattr(self.args, k)) for k in STAGE_FLAGS}
        if path.is_file():
            before = json.loads(path.read_text())
            changed = [k for k in STAGE_FLAGS if k in before and before[k] != now[k]]
            if changed:
                k = changed[0]
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

    def log(self, t: int, metrics: dict) -> None:
        self.logger.log({"iteration": t, **metrics}, step=self.global_step)

    # 1. generation --------------------------------------------------------------------------
    def generate(self, t: int, model) -> None:
        work = self.work_dir(t)
        final = work / "generations.jsonl"
        if final.is_file():
            return
        work.mkdir(parents=True, exist_ok=True)
        mine = rank_slice(len(self.prompts), self.rank, self.world)
        stats = generate_to_file(
            model(), [(i, self.prompts[i]) for i in mine], work / f"generations.rank{self.rank}.jsonl",
            max_new_tokens=self.args.max_new_tokens, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
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
        if (work / "pairs.jsonl").is_file():
            return
        if self.rank == 0:
            generations = {row["index"]: row for row in _read_jsonl(work / "generations.jsonl")}
            pairs, identical, empty = [], 0, 0
            for ex, prompt in zip(self.examples, self.prompts):
                gen = generations[ex.index]["generated_ids"]
                real = self.encoder.fit_response(prompt, self.encoder.response_ids(ex.response), self.args.max_len)
                generated = self.encoder.fit_response(prompt, list(gen), self.args.max_len)
                if not [i for i in generated if i != self.tok.eos_id]:
                    empty += 1  # an empty answer teaches nothing and dilutes the batch
                    continue
                if generated == real:
                    identical += 1  # equal answers give a zero loss gradient
                    continue
                pairs.append({"index": ex.index, "prompt_id": ex.prompt_id, "prompt_ids": prompt,
                              "real_ids": real, "generated_ids": generated})
            stats = {"pairs": len(pairs), "dropped_identical": identical, "dropped_empty": empty,
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
            raise ValueError(f"{self.work_dir(t) / 'pairs.jsonl'}: no pairs to train on (all generations were "
                             f"empty or equal to the real answers); see pairs_stats.json")
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
        batch = min(args.global_batch_size, len(pairs) // (args.micro_batch_size * self.world)
                    * args.micro_batch_size * self.world) or args.global_batch_size
        if batch != args.global_batch_size:
            fabric.print(f"iter{t}: only {len(pairs)} pairs, global batch lowered to {batch}")
        check_batch_sizes(batch, args.micro_batch_size, self.world)
        total = len(epoch_batches(len(pairs), batch, args.seed + t, 0)) * args.epochs
        if args.max_steps:
            total = min(total, args.max_steps)

        model = setup_model(fabric, load_model_from_any(self.model_dir(t), kernels=args.kernels))
        params = [p for p in model.parameters() if p.requires_grad]
        if args.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(params, lr=peak_lr, weight_decay=args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=args.weight_decay)
        optimizer = fabric.setup_optimizers(optimizer)
        model.train()
        step = 0
        bar = tqdm(total=total, desc=f"iter{t} train", disable=args.no_progress or self.rank != 0)
        t0 = time.perf_counter()
        for epoch in range(args.epochs):
            for global_batch in epoch_batches(len(pairs), batch, args.seed + t, epoch):
                if step >= total:
                    break
                lr = lr_at(step, total, peak_lr, args.warmup_ratio, args.lr_schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sums: dict[str, float] = {}
                for micro in rank_micro_batches(global_batch, self.rank, self.world, args.micro_batch_size):
                    chunk = [pairs[i] for i in micro]
                    real, gen = self.policy_logps(model, chunk)
                    idx = torch.tensor(micro)
                    loss, m = spin_loss(real, gen, ref_real[idx].to(real.device), ref_gen[idx].to(real.device),
                                        args.beta)
                    # micro-batch mean -> share of the global-batch mean (x world: FSDP averages over ranks)
                    fabric.backward(loss * len(micro) / batch * self.world)
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * len(micro)
                grad_norm = clip_grad_norm(model, args.grad_clip) \
                    if args.grad_clip > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                self.global_step += 1
                keys = sorted(sums)
                summed = fabric.all_reduce(torch.tensor([sums[k] for k in keys], device=fabric.device),
                                           reduce_op="sum")
                metrics = {k: float(v) / batch for k, v in zip(keys, summed)}
                metrics.update(lr=lr, epoch=epoch, pairs_per_s=step * batch / (time.perf_counter() - t0))
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                self.log(t, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        bar.close()
        save_finetuned(fabric, model, self.model_dir(t + 1), self.tok, self.template)

    # the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        self.check_run_args()
        state = read_state(args.out)
        done = int(state.get("completed_iterations", 0))
        if done >= args.iterations:
            self.fabric.print(f"{args.out}: all {args.iterations} iterations already complete")
        if done:
            self.fabric.print(f"resuming after {done} completed iteration(s)")
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
                write_json(args.out / STATE_FILE, {"completed_iterations": t + 1})
                self.log(t, {"iteration_done": t + 1})
            self.fabric.barrier()
            self.fabric.print(f"saved {self.model_dir(t + 1)}")
        self.logger.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        SpinRun(args).run()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
