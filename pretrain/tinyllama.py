"""Pretrain a TinyLlama-style Llama-2 with FSDP2 through Lightning Fabric.

    python pretrain/tinyllama.py --config tiny --data DIR:1 --out OUT --max-steps 100 ...   (one process)
    fabric run --accelerator cuda --devices 8 --num-nodes 4 pretrain/tinyllama.py --config tinyllama-1.1b \
        --data-root DATA --out OUT --resume auto                                            (a cluster)

The defaults are TinyLlama's recipe (context 2048, 1024 sequences ≈ 2M tokens per step,
AdamW 4e-4, betas 0.9/0.95, wd 0.1, 2000 warmup steps, cosine to 4e-5, clip 1.0, bf16).
The loop: each optimizer step reads this rank's micro-batches of the global batch (a
pure function of the seed and the step, see pretrain/data.py), accumulates gradients,
clips, skips the update if the loss or gradient norm is non-finite, and logs, validates,
checkpoints, and stops cleanly on SIGTERM/SIGUSR1 at step boundaries.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from model import PRESETS, Config, Llama
from pretrain.checkpoint import (CheckpointError, load_training_checkpoint, resolve_resume, save_consolidated,
                                 save_training_checkpoint, step_dir_name)
from pretrain.data import (DataError, MixtureSampler, SourceSpec, make_loader, parse_source, resolve_data_dirs,
                           validation_indices)
from pretrain.metrics import MetricsLogger, measure_peak_memory_gb, measure_peak_reserved_gb, peak_flops_per_second
from pretrain.parallel import PRECISIONS, build_fabric, clip_grad_norm, default_precision, launch, setup_model
from pretrain.schedule import lr_at

VAL_SEED = 20240101  # the validation windows do not depend on --seed, so runs stay comparable


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FSDP2 pretraining of a Llama-2 model on a weighted mixture of token shards "
                    "(defaults: TinyLlama-1.1B recipe).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--config", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model preset")
    g.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocab size (match your tokenizer)")
    g.add_argument("--block-size", type=int, default=None, help="context length; default: the preset's")
    g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="kernel backend")
    g.add_argument("--document-mask", action="store_true",
                   help="attend only within each document of a window (documents end with the shards' EOS) "
                        "and restart RoPE positions at each document; see docs/pretrain.md")
    g.add_argument("--document-attention", default="auto", choices=["auto", "flash-varlen", "flex", "sdpa-mask"],
                   help="kernel for --document-mask; auto: flash-attn varlen, else flex_attention on CUDA, "
                        "else SDPA with a dense mask")
    g.add_argument("--tokenizer", default=None,
                   help="sentencepiece model copied into every checkpoint and final/ as tokenizer.model")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="DIR:WEIGHT",
                   help="token-shard directories with mixture weights; default: "
                        "DATA_ROOT/slimpajama/train:0.7 DATA_ROOT/starcoder/train:0.3")
    g.add_argument("--data-root", default=None, help="root of data_prep's output, for the default mixture")
    g.add_argument("--val-data", nargs="+", default=None, metavar="DIR[:WEIGHT]",
                   help="held-out shard directories for the validation loss; default: none "
                        "(or DATA_ROOT/*/validation when --data-root is given and they exist)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=1_430_000,
                   help="optimizer steps (TinyLlama: ~3T tokens at 2M tokens/step)")
    g.add_argument("--global-batch-size", type=int, default=1024, help="sequences per optimizer step, all ranks")
    g.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward per rank")
    g.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=4e-5, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, default=2000, help="linear warmup steps")
    g.add_argument("--lr-decay-steps", type=int, default=None, help="cosine ends here; default: --max-steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="applied to matrices, not norms")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip; 0 disables")
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many non-finite steps in a row")
    g.add_argument("--seed", type=int, default=42, help="seeds the init and the data order")
    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--accelerator", default="auto", help="cpu, cuda or auto (fabric run's flags take over)")
    g.add_argument("--devices", default="auto", help="processes per node (fabric run's flags take over)")
    g.add_argument("--num-nodes", type=int, default=1, help="nodes (fabric run's flags take over)")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: bf16-mixed on CUDA, 32-true on CPU")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory (checkpoints/, final/, metrics.jsonl)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="keep the newest K checkpoints; 0 keeps all")
    g.add_argument("--no-save", action="store_true",
                   help="write no checkpoint and no final model (throughput benchmarks, throwaway runs)")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': newest complete checkpoint in OUT/checkpoints (fresh start if none); or a path")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="save and exit after this many steps in this invocation (time-boxed jobs); "
                        "the schedule still follows --max-steps")
    g.add_argument("--log-every", type=int, default=10, help="log metrics every N optimizer steps")
    g.add_argument("--profile-step", type=int, default=None, metavar="N",
                   help="profile optimizer step N (CPU and GPU): print the costliest operations and write "
                        "a Chrome/Perfetto trace to OUT/profile/")
    g.add_argument("--val-every", type=int, default=1000, help="validation loss every N steps (and at the end)")
    g.add_argument("--val-batches", type=int, default=50, help="micro-batches per rank per validation")
    g.add_argument("--wandb-project", default="tinyllama", help="wandb project name")
    g.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"],
                   help="offline writes OUT/wandb and never uses the network; `wandb sync` uploads later")
    # Debug hooks for tests; hidden from --help.
    p.add_argument("--debug-nan-steps", default="", help=argparse.SUPPRESS)
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args) -> None:
    problems = []
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "save_every", "log_every", "val_every",
                 "max_skipped_steps"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.val_batches < 0 or args.num_workers < 0 or args.warmup_steps < 0 or args.keep_last < 0:
        problems.append("--val-batches, --num-workers, --warmup-steps and --keep-last must be >= 0")
    if args.profile_step is not None and args.profile_step <= 0:
        problems.append(f"--profile-step must be a step number >= 1, got {args.profile_step}")
    if args.min_lr > args.lr:
        problems.append(f"--min-lr ({args.min_lr}) is larger than --lr ({args.lr})")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        problems.append(f"--tokenizer {args.tokenizer}: no such file")
    if problems:
        raise ValueError("; ".join(problems))


class StopSignal:
    """SIGTERM/SIGUSR1 (cluster preemption, SLURM's --signal) only set a flag; the loop
    saves a checkpoint at the next step boundary and exits 0."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


class StepProfiler:
    """torch.profiler around one optimizer step: the 25 costliest operations by device time
    (by CPU time on a CPU run) printed, and the whole timeline in OUT/profile/ for Perfetto."""

    def __init__(self, out: Path, rank: int):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.path = out / "profile" / f"step-rank{rank}.json"
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def finish(self, fabric, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        fabric.print(f"profile of step {step} (trace: {self.path}):\n"
                     f"{self.prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)}")


def build_model(fabric, config: Config, args) -> torch.nn.Module:
    if fabric.device.type == "cuda":
        # No rank ever holds the full fp32 weights: build on meta, shard, materialise, init.
        with torch.device("meta"):
            model = Llama(config, kernels=args.kernels)
    else:
        # CPU: a full seeded build, so any number of ranks starts from identical weights.
        torch.manual_seed(args.seed)
        model = Llama(config, kernels=args.kernels)
    return setup_model(fabric, model, seed=args.seed)


def make_optimizer(model, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms: decaying them only hurts
    # On CUDA the fused AdamW updates every parameter in a few kernels instead of a dozen
    # launches per tensor group; the CPU keeps the default implementation.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused or None)


@torch.no_grad()
def validate(fabric, model, sampler: MixtureSampler, args, model_kwargs: dict) -> float:
    model.eval()
    total = torch.zeros((), device=fabric.device)
    batches = validation_indices(args.val_batches, args.micro_batch_size, fabric.global_rank, fabric.world_size)
    for indices in batches:
        x, y = sampler.batch(indices)
        total += model(x.to(fabric.device), targets=y.to(fabric.device), **model_kwargs).float()
    model.train()
    mean = fabric.all_reduce(total / max(1, len(batches)), reduce_op="mean")
    return float(mean)


def default_val_dirs(args) -> list[SourceSpec]:
    if args.val_data:
        return [parse_source(s) for s in args.val_data]
    if args.data_root and not args.data:
        dirs = [Path(args.data_root) / name / "validation" for name in ("slimpajama", "starcoder")]
        return [SourceSpec(d, 1.0) for d in dirs if d.is_dir()]
    return []


def train(args) -> int:
    check_args(args)
    accelerator = os.environ.get("LT_ACCELERATOR", args.accelerator)
    precision = args.precision or default_precision(accelerator)
    fabric = build_fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                          precision=precision, activation_checkpointing=args.activation_checkpointing,
                          compile=args.compile)
    stop = StopSignal()
    launch(fabric)
    rank, world = fabric.global_rank, fabric.world_size
    out = Path(args.out)
    ckpt_root = out / "checkpoints"

    per_step = world * args.micro_batch_size
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {args.micro_batch_size} x {world} = {per_step}")
    accum = args.global_batch_size // per_step

    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("block_size", args.block_size)) if v}
    config = Config.from_name(args.config, **overrides)
    block = config.block_size
    sampler = MixtureSampler(resolve_data_dirs(args.data, args.data_root), block, args.seed, config.vocab_size)
    val_specs = default_val_dirs(args)
    val_sampler = MixtureSampler(val_specs, block, VAL_SEED, config.vocab_size) if val_specs and args.val_batches else None

    model = build_model(fabric, config, args)
    optimizer = fabric.setup_optimizers(make_optimizer(model, args))

    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    train_state = {"step": 0, "tokens_seen": 0, "next_sample_index": 0, "skipped_steps": 0,
                   "config": config.to_dict(), "global_batch_size": args.global_batch_size}
    resume_path, ignored = resolve_resume(args.resume, ckpt_root)
    for bad in ignored:
        fabric.print(f"ignoring incomplete checkpoint {bad} (no COMPLETE marker: cut off mid-write)")
    if resume_path is not None:
        loaded = load_training_checkpoint(fabric, resume_path, model, optimizer)
        if loaded.get("config") != config.to_dict():
            raise CheckpointError(f"{resume_path}: saved model config {loaded.get('config')} differs from this "
                                  f"run's {config.to_dict()}; resume with the same --config/--vocab-size/--block-size")
        if loaded.get("global_batch_size") != args.global_batch_size:
            raise CheckpointError(f"{resume_path}: saved with --global-batch-size {loaded.get('global_batch_size')}, "
                                  f"this run has {args.global_batch_size}; the data order depends on it")
        train_state.update(loaded)
        fabric.print(f"resumed from {resume_path} at step {train_state['step']} "
                     f"({train_state['tokens_seen']:,} tokens seen)")
    elif args.resume == "auto":
        fabric.print(f"--resume auto: no checkpoint in {ckpt_root}, starting from scratch")

    start_step = int(train_state["step"])
    end_step = args.max_steps if args.stop_after_steps is None else min(args.max_steps, start_step + args.stop_after_steps)
    decay_steps = args.lr_decay_steps or args.max_steps
    tokens_per_step = args.global_batch_size * block
    flops_per_token = config.flops_per_token(block)
    peak = peak_flops_per_second(fabric.device)
    nan_steps = {int(s) for s in args.debug_nan_steps.split(",") if s.strip()}

    logger = MetricsLogger(out, enabled=rank == 0, wandb_project=args.wandb_project, wandb_mode=args.wandb_mode,
                           run_config={**run_args, "world_size": world, "num_params": config.num_params})
    fabric.print(f"model {config.name}: {config.num_params:,} parameters, context {block}, vocab {config.vocab_size}; "
                 f"{world} rank(s) x {accum} micro-batch(es) of {args.micro_batch_size} = "
                 f"{args.global_batch_size} sequences ({tokens_per_step:,} tokens) per step; precision {precision}")
    fabric.print(f"data: {sampler.describe()}")
    document_kwargs: dict = {}
    if args.document_mask:
        from model.document_mask import document_attention_backend

        eos = sampler.eos_id()
        if val_sampler is not None and val_sampler.eos_id() != eos:
            raise DataError(f"validation shards end documents with EOS {val_sampler.eos_id()}, training shards "
                            f"with {eos}; tokenize both with the same tokenizer")
        kernel = document_attention_backend(fabric.device, torch.bfloat16 if precision == "bf16-mixed"
                                            else torch.float32, args.document_attention)
        document_kwargs = {"document_eos": eos, "document_backend": kernel}
        fabric.print(f"attention within documents (EOS id {eos}): kernel {kernel}; RoPE positions restart "
                     f"at each document")
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    fabric.print(f"FSDP2: rank 0 holds {local:,} of {config.num_params:,} parameter elements")

    loader = make_loader(sampler, start_step, args.global_batch_size, args.micro_batch_size, rank, world,
                         end_step, args.num_workers)
    batches = iter(loader)
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=args.max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def save(step_done: int) -> Path:
        path = save_training_checkpoint(fabric, ckpt_root, step_done, model, optimizer, dict(train_state),
                                        config, run_args, tokenizer=args.tokenizer, keep_last=args.keep_last)
        fabric.print(f"saved checkpoint {path}")
        return path

    consecutive_skips, last_saved = 0, (start_step if resume_path is not None else None)
    window_start, window_tokens, window_wait, window_losses = time.perf_counter(), 0, 0.0, []
    step, exit_reason = start_step, "done"
    model.train()
    try:
        while step < end_step:
            profiler = StepProfiler(out, rank) if args.profile_step == step + 1 else None
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=fabric.device)
            for micro in range(accum):
                t0 = time.perf_counter()
                x, y = next(batches)
                x, y = x.to(fabric.device, non_blocking=True), y.to(fabric.device, non_blocking=True)
                window_wait += time.perf_counter() - t0
                loss = model(x, targets=y, **document_kwargs)
                if step + 1 in nan_steps:
                    loss = loss * float("nan")
                # Equal-length windows with no ignored tokens: the mean of micro-batch means is the
                # global mean, so each backward gets loss/accum. Gradients are reduce-scattered
                # (fp32) after every micro-batch, accumulating into the sharded fp32 grads.
                fabric.backward(loss / accum)
                loss_sum += loss.detach().float()
            global_loss = fabric.all_reduce(loss_sum / accum, reduce_op="mean")
            grad_norm = clip_grad_norm(model, args.grad_clip)
            loss_value, norm_value = float(global_loss), float(grad_norm)
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                optimizer.step()
                consecutive_skips = 0
                window_losses.append(loss_value)
            else:
                train_state["skipped_steps"] += 1
                consecutive_skips += 1
                fabric.print(f"step {step + 1}: non-finite loss {loss_value} / grad norm {norm_value}; update skipped "
                             f"({consecutive_skips} in a row)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_state.update(step=step, tokens_seen=train_state["tokens_seen"] + tokens_per_step,
                               next_sample_index=step * args.global_batch_size)
            window_tokens += tokens_per_step
            if profiler is not None:
                profiler.finish(fabric, step)
            if consecutive_skips >= args.max_skipped_steps:
                raise TrainingError(
                    f"the loss or gradient norm was non-finite for {consecutive_skips} steps in a row "
                    f"(steps {step - consecutive_skips + 1}..{step}; limit --max-skipped-steps "
                    f"{args.max_skipped_steps}). Stopping without saving; resume from the last checkpoint in "
                    f"{ckpt_root} with a lower --lr or check the data.")
            if args.debug_step_delay:
                time.sleep(args.debug_step_delay)

            if step % args.log_every == 0 or step == end_step:
                if fabric.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / elapsed
                metrics = {
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "lr": lr, "grad_norm": norm_value,
                    "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / world,
                    "mfu": (flops_per_token * tps / (peak * world)) if peak else None,
                    "peak_memory_gb": measure_peak_memory_gb(fabric.device),
                    "peak_reserved_gb": measure_peak_reserved_gb(fabric.device),
                    "data_wait_share": window_wait / elapsed,
                    "tokens_seen": train_state["tokens_seen"], "skipped_steps": train_state["skipped_steps"],
                    **sampler.source_epochs(train_state["next_sample_index"]),  # epoch/<k>: passes over source k
                }
                logger.log(metrics, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                         mfu="n/a" if peak is None else f"{metrics['mfu']:.1%}",
                                         mem=f"{metrics['peak_memory_gb']:.1f}GB", refresh=False)
                window_start, window_tokens, window_wait, window_losses = time.perf_counter(), 0, 0.0, []
            if progress is not None:
                progress.update(1)

            if val_sampler is not None and (step % args.val_every == 0 or step == args.max_steps):
                val_loss = validate(fabric, model, val_sampler, args, document_kwargs)
                logger.log({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}, step)
                fabric.print(f"step {step}: validation loss {val_loss:.4f}")
                window_start = time.perf_counter()  # validation time is not training throughput

            if step % args.save_every == 0 and step != end_step and not args.no_save:
                save(step)
                last_saved = step
            # Every rank must agree to stop, or the collectives of the save would hang.
            signalled = torch.tensor(1.0 if stop.received else 0.0, device=fabric.device)
            if world > 1:
                signalled = fabric.all_reduce(signalled, reduce_op="sum")
            if signalled.item() > 0:
                exit_reason = "signal"
                break
    finally:
        if progress is not None:
            progress.close()

    if args.no_save:
        fabric.print(f"--no-save: stopped after {step} steps; nothing written but {out / 'metrics.jsonl'}")
        logger.close()
        return 0
    if last_saved != step:
        save(step)
    if exit_reason == "signal":
        fabric.print(f"received a stop signal: saved {ckpt_root / step_dir_name(step)}; continue with --resume auto")
    elif step >= args.max_steps:
        save_consolidated(fabric, model, out / "final", tokenizer=args.tokenizer)
        fabric.print(f"training finished: {step} steps, {train_state['tokens_seen']:,} tokens; "
                     f"consolidated model in {out / 'final'}")
    logger.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except (DataError, CheckpointError, TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
