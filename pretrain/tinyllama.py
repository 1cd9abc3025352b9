"""Pretrain a TinyLlama-style Llama-2 with FSDP2 through Lightning Fabric.

    python pretrain/tinyllama.py --config tiny --data DIR:1 --out OUT --max-steps 100 ...   (one process)
    fabric run --accelerator cuda --devices 8 --num-nodes 4 pretrain/tinyllama.py --config tinyllama-1.1b \
        --data-root DATA --out OUT --resume auto                                            (a cluster)

The defaults are TinyLlama's recipe (context 2048, 1024 sequences ≈ 2M tokens per step,
AdamW 4e-4, betas 0.9/0.95, wd 0.1, 2000 warmup steps, cosine to 4e-5, clip 1.0, bf16).
This file holds what is particular to pretraining: its options, the data (each optimizer
step reads this rank's micro-batches of the global batch, a pure function of the seed and
the step, see pretrain/data.py), the loss, validation, checkpoints and the stop on
SIGTERM/SIGUSR1 at step boundaries. The optimizer step itself (accumulation with one
gradient sync, clipping, the non-finite skip), the seeded sharded init and the throughput
and MFU accounting are the engine's (pretrain/engine.py, shared with SFT and SPIN).
The resolved options go to OUT/config.yaml; `--run-config OUT/config.yaml` starts the run again.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.run_state import SUMMARY_NAME
from data_prep.tokenizer import tokenizer_file
from model import PRESETS, Config
from pretrain import init_from
from pretrain.checkpoint import (CheckpointError, load_training_checkpoint, resolve_resume, save_consolidated,
                                 save_training_checkpoint, step_dir_name)
from pretrain.data import (DataError, MixtureSampler, SourceSpec, make_loader, parse_source, resolve_data_dirs,
                           validation_indices)
from pretrain.engine import (MFU_CONVENTION, CommonOptions, Engine, Throughput, TrainingError, build_optimizer,
                             compiled_graphs, graph_breaks, init_model, memory_metrics, mfu_metrics,
                             print_run_description, run_description, select_attention, setup_fabric)
from pretrain.metrics import MetricsLogger, peak_flops_per_second
from pretrain.options import as_dict, opt, parse_options, script_name, write_run_config
from pretrain.schedule import lr_at
from pretrain.sharded_load import load_sharded

DEFAULT_PRESET = "tinyllama-1.1b"
VAL_SEED = 20240101  # the validation windows do not depend on --seed, so runs stay comparable


@dataclass(kw_only=True)
class PretrainOptions(CommonOptions):
    """Every option of pretrain/tinyllama.py; the flag of field `micro_batch_size` is --micro-batch-size."""

    # model
    config: str | None = opt(None, f"model preset; default: {DEFAULT_PRESET}, or --init-from's model",
                             choices=sorted(PRESETS))
    init_from: Path | None = opt(None, "continue pretraining this model: ours, a pretraining checkpoint or output "
                                       "directory, or an HF Llama/Mistral directory; its config, weights and "
                                       "tokenizer, a fresh optimizer and schedule (docs/pretrain.md)",
                                 metavar="CKPT")
    vocab_size: int | None = opt(None, "override the preset's vocab size (match your tokenizer)", minimum=1)
    block_size: int | None = opt(None, "context length; default: the preset's (or --init-from's)", minimum=1)
    tokenizer: Path | None = opt(None, "tokenizer copied into every checkpoint and final/ (a sentencepiece .model, "
                                       "an HF tokenizer.json, or a directory holding one with its JSON files); "
                                       "default with --init-from: its tokenizer")
    document_mask: bool = opt(False, "attend only within each document of a window (documents end with the shards' "
                                     "EOS) and restart RoPE positions at each document; see docs/pretrain.md")
    document_attention: str = opt("auto", "kernel for --document-mask; auto: flex_attention on CUDA (no host "
                                          "wait), SDPA with a dense mask on CPU; flash-varlen: flash-attn's "
                                          "(one host wait per micro-batch)",
                                  choices=["auto", "flash-varlen", "flex", "sdpa-mask"])
    # data
    data: list[str] | None = opt(None, "token-shard directories with mixture weights; default: "
                                       "DATA_ROOT/slimpajama/train:0.7 DATA_ROOT/starcoder/train:0.3",
                                 metavar="DIR:WEIGHT")
    data_root: str | None = opt(None, "root of data_prep's output, for the default mixture")
    val_data: list[str] | None = opt(None, "held-out shard directories for the validation loss; default: none "
                                           "(or DATA_ROOT/*/validation when --data-root is given and they exist)",
                                     metavar="DIR[:WEIGHT]")
    num_workers: int = opt(2, "DataLoader worker processes per rank", minimum=0)
    # optimisation
    max_steps: int = opt(1_430_000, "optimizer steps (TinyLlama: ~3T tokens at 2M tokens/step)", minimum=1)
    global_batch_size: int = opt(1024, "sequences per optimizer step, all ranks", minimum=1)
    micro_batch_size: int = opt(8, "sequences per forward/backward per rank", minimum=1)
    lr: float = opt(4e-4, "peak learning rate", minimum=0)
    min_lr: float = opt(4e-5, "learning rate at the end of the cosine", minimum=0)
    warmup_steps: int = opt(2000, "linear warmup steps", minimum=0)
    lr_decay_steps: int | None = opt(None, "cosine ends here; default: --max-steps", minimum=1)
    weight_decay: float = opt(0.1, "applied to matrices, not norms", minimum=0)
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "global grad-norm clip; 0 disables", minimum=0)
    max_skipped_steps: int = opt(10, "stop after this many non-finite steps in a row", minimum=1)
    seed: int = opt(42, "seeds the init and the data order")
    # parallelism and precision (and --accelerator, --devices, --num-nodes, --precision, --reduce-dtype, --kernels)
    activation_checkpointing: bool = opt(False, "recompute each block in backward")
    compile: bool = opt(False, "torch.compile each block (graph breaks are logged as graph_breaks)")
    fp8: bool = opt(False, "float8 matmuls in the block linears through torchao (pip install -e '.[fp8]'; CUDA "
                           "capability >= 8.9); lm_head stays bf16; use with --compile (docs/pretrain.md)")
    # output
    out: Path = opt(help="output directory (config.yaml, checkpoints/, final/, metrics.jsonl)")
    save_every: int = opt(1000, "checkpoint every N steps (and at the end)", minimum=1)
    keep_last: int = opt(3, "keep the newest K checkpoints; 0 keeps all", minimum=0)
    no_save: bool = opt(False, "write no checkpoint and no final model (benchmarks)")
    resume: str | None = opt(None, "'auto': newest complete checkpoint in OUT/checkpoints (fresh start if "
                                   "none); or a path", metavar="auto|PATH")
    stop_after_steps: int | None = opt(None, "save and exit after this many steps in this invocation (time-boxed "
                                             "jobs); the schedule still follows --max-steps", minimum=1)
    log_every: int = opt(10, "log metrics every N optimizer steps", minimum=1)
    profile_step: int | None = opt(None, "profile optimizer step N (CPU and GPU): print the costliest operations "
                                         "and write a Chrome/Perfetto trace to OUT/profile/", minimum=1,
                                   metavar="N")
    val_every: int = opt(1000, "validation loss every N steps (and at the end)", minimum=1)
    val_batches: int = opt(50, "micro-batches per rank per validation", minimum=0)
    wandb_project: str = opt("tinyllama", "wandb project name")
    # debug hooks for tests, hidden from --help
    debug_nan_steps: str = opt("", hidden=True)
    debug_inf_grad_steps: str = opt("", hidden=True)
    debug_fp8_emulate: bool = opt(False, hidden=True)  # torchao's float8 emulation: --fp8 on CPU in tests
    # "STEP:SIGNAL[:RANK]": after optimizer step STEP the rank (every rank without RANK) sends
    # itself SIGNAL, so a test stops the run at a step it chooses instead of racing a timer
    debug_signal: str = opt("", hidden=True)

    def problems(self) -> list[str]:
        problems = []
        if self.min_lr > self.lr:
            problems.append(f"--min-lr ({self.min_lr}) is larger than --lr ({self.lr})")
        if self.tokenizer and tokenizer_file(self.tokenizer) is None:
            problems.append(f"--tokenizer {self.tokenizer}: no such file (nor a directory holding tokenizer.json "
                            f"or tokenizer.model)")
        return problems


def parse_args(argv=None) -> PretrainOptions:
    return parse_options(
        PretrainOptions, argv,
        description="FSDP2 pretraining of a Llama-2 model on a weighted mixture of token shards "
                    "(defaults: TinyLlama-1.1B recipe).",
        epilog="Every run writes its resolved options to OUT/config.yaml; "
               "`python pretrain/tinyllama.py --run-config OUT/config.yaml --resume auto` continues it.")


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
        self.start = time.perf_counter()

    def finish(self, fabric, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if torch.cuda.is_available():
            # Kernel time over the step's wall time: how much of the step the GPU was busy.
            busy = sum(e.self_device_time_total for e in self.prof.key_averages()) / 1e6
            fabric.print(f"profile: GPU busy {busy * 1e3:.1f} ms of the {wall * 1e3:.1f} ms step "
                         f"({busy / wall:.1%})")
        self.prof.export_chrome_trace(str(self.path))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        fabric.print(f"profile of step {step} (trace: {self.path}):\n"
                     f"{self.prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)}")


def document_splitter(fabric, args, sampler: MixtureSampler, val_sampler, precision: str, window: int | None):
    """With --document-mask, a function giving a micro-batch's documents (model.document_mask.Documents,
    built once per micro-batch and shared by every layer), after checking that every shard ends
    documents with the same EOS; the kernel is printed. Without it, a function giving None."""
    if not args.document_mask:
        return lambda x: None
    from model.document_mask import Documents, document_attention_backend

    eos = sampler.eos_id()
    if val_sampler is not None and val_sampler.eos_id() != eos:
        raise DataError(f"validation shards end documents with EOS {val_sampler.eos_id()}, training shards "
                        f"with {eos}; tokenize both with the same tokenizer")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    kernel = document_attention_backend(fabric.device, dtype, args.document_attention)
    fabric.print(f"attention within documents (EOS id {eos}): kernel {kernel}; RoPE positions restart "
                 f"at each document")
    return lambda x: Documents(x, eos, kernel, window=window)


@torch.no_grad()
def validate(fabric, model, sampler: MixtureSampler, args, documents_of) -> float:
    model.eval()
    total = torch.zeros((), device=fabric.device)
    batches = validation_indices(args.val_batches, args.micro_batch_size, fabric.global_rank, fabric.world_size)
    for indices in batches:
        x, y = sampler.batch(indices)
        x, y = x.to(fabric.device), y.to(fabric.device)
        total += model(x, targets=y, documents=documents_of(x)).float()
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


def train(args: PretrainOptions) -> int:
    # --init-from, --tokenizer and the shards are checked before anything is written.
    init = init_from.resolve(args.init_from, args.config, args.vocab_size, args.block_size) if args.init_from else None
    if init is not None:
        config = init.config
    else:
        overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("block_size", args.block_size)) if v}
        config = Config.from_name(args.config or DEFAULT_PRESET, **overrides)
    # the same checks as every other command: it loads, and its ids fit the embedding
    tokenizer = init_from.run_tokenizer(init, args.tokenizer, config.vocab_size)
    tokenizer_source = tokenizer[1] if tokenizer is not None else None
    train_specs, val_specs = resolve_data_dirs(args.data, args.data_root), default_val_dirs(args)
    unchecked = []
    if tokenizer is not None:  # shards of another tokenizer are refused
        what = "--tokenizer" if args.tokenizer else f"--init-from {args.init_from}'s tokenizer"
        unchecked = init_from.check_shards_tokenizer(tokenizer[0], [s.directory for s in train_specs + val_specs],
                                                     what)

    stop = StopSignal()
    fabric = setup_fabric(args, activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                          seed=args.seed)
    rank, world = fabric.global_rank, fabric.world_size
    out = Path(args.out)
    ckpt_root = out / "checkpoints"

    per_step = world * args.micro_batch_size
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {args.micro_batch_size} x {world} = {per_step}")
    accum = args.global_batch_size // per_step

    # The training windows: the model's context, or --block-size (which, with --init-from, leaves a
    # longer context of the model as it is).
    block = init.window if init is not None else config.block_size
    sampler = MixtureSampler(train_specs, block, args.seed, config.vocab_size)
    val_sampler = MixtureSampler(val_specs, block, VAL_SEED, config.vocab_size) if val_specs and args.val_batches else None
    if unchecked:
        fabric.print(f"tokenizer of the shards: not recorded in {', '.join(map(str, unchecked))} (no "
                     f"{SUMMARY_NAME} from data_prep); only their vocab_size was checked against {what}")

    convert, fp8_all_gather = None, False
    if args.fp8:
        from pretrain import fp8

        problem = fp8.fp8_problem(fabric.device, args.debug_fp8_emulate)
        if problem:
            raise ValueError(problem)
        fp8_all_gather = fabric.device.type == "cuda"  # torchao's float8 all-gather is CUDA's
        converted = []
        convert = lambda m: converted.append(fp8.convert_fp8(m, args.debug_fp8_emulate, fp8_all_gather))  # noqa: E731
    resume_path, ignored = resolve_resume(args.resume, ckpt_root)
    if init is not None and resume_path is None:
        model = load_sharded(fabric, init.path, args.kernels, config=config, convert=convert)
        fabric.print(f"--init-from {args.init_from}: weights of {init.path} loaded into the shards; fresh "
                     f"optimizer and schedule from step 0")
    else:
        model = init_model(fabric, config, args.kernels, args.seed, convert=convert)
        if init is not None:
            fabric.print(f"--init-from {args.init_from} is not read: resuming from {resume_path}, which holds "
                         f"this run's weights")
    if args.fp8:
        fabric.print(fp8.fp8_description(converted[0], fp8_all_gather, args.debug_fp8_emulate))
        if not args.compile:
            fabric.print("fp8: without --compile the float8 casts run as separate kernels; add --compile for speed")
    optimizer = build_optimizer(fabric, model, name="adamw", lr=args.lr, weight_decay=args.weight_decay,
                                betas=(args.beta1, args.beta2), eps=args.adam_eps)
    compute_dtype = torch.bfloat16 if fabric.train_precision == "bf16-mixed" else torch.float32
    attention_choice = select_attention(fabric, config, args.micro_batch_size, compute_dtype)
    resolved = run_description(fabric, model, args.kernels) | attention_choice

    run_args = as_dict(args)
    train_state = {"step": 0, "tokens_seen": 0, "next_sample_index": 0, "skipped_steps": 0,
                   "config": config.to_dict(), "global_batch_size": args.global_batch_size}
    for bad in ignored:
        fabric.print(f"ignoring incomplete checkpoint {bad} (no COMPLETE marker: cut off mid-write)")
    if resume_path is not None:
        loaded = load_training_checkpoint(fabric, resume_path, model, optimizer)
        # Compared as Configs: a checkpoint saved before a Config field existed holds its default.
        if loaded.get("config") is None or Config.from_dict(loaded["config"]) != config:
            raise CheckpointError(f"{resume_path}: saved model config {loaded.get('config')} differs from this "
                                  f"run's {config.to_dict()}; resume with the same --config/--init-from/"
                                  f"--vocab-size/--block-size")
        if loaded.get("global_batch_size") != args.global_batch_size:
            raise CheckpointError(f"{resume_path}: saved with --global-batch-size {loaded.get('global_batch_size')}, "
                                  f"this run has {args.global_batch_size}; the data order depends on it")
        train_state.update(loaded, config=config.to_dict())
        fabric.print(f"resumed from {resume_path} at step {train_state['step']} "
                     f"({train_state['tokens_seen']:,} tokens seen)")
    elif args.resume == "auto":
        fabric.print(f"--resume auto: no checkpoint in {ckpt_root}, starting from scratch")

    start_step = int(train_state["step"])
    end_step = args.max_steps if args.stop_after_steps is None else min(args.max_steps, start_step + args.stop_after_steps)
    decay_steps = args.lr_decay_steps or args.max_steps
    tokens_per_step = args.global_batch_size * block
    peak = peak_flops_per_second(fabric.device)
    nan_steps = {int(s) for s in args.debug_nan_steps.split(",") if s.strip()}
    inf_grad_steps = {int(s) for s in args.debug_inf_grad_steps.split(",") if s.strip()}
    signal_step, signal_name, *signal_rank = args.debug_signal.split(":") if args.debug_signal else (0, "", None)
    signal_here = bool(args.debug_signal) and signal_rank in ([], [str(rank)])

    resolved.update(accumulation=accum, num_params=config.num_params, peak_flops=peak)
    if rank == 0:
        write_run_config(out, script_name(__file__), args, resolved)
    logger = MetricsLogger(out, enabled=rank == 0, wandb_project=args.wandb_project, wandb_mode=args.wandb_mode,
                           run_config={**run_args, **{f"resolved/{k}": v for k, v in resolved.items()}})
    windows = "" if block == config.block_size else f" (training windows of {block})"
    fabric.print(f"model {config.name}: {config.num_params:,} parameters, context {config.block_size}{windows}, "
                 f"vocab {config.vocab_size}; "
                 f"{world} rank(s) x {accum} micro-batch(es) of {args.micro_batch_size} = "
                 f"{args.global_batch_size} sequences ({tokens_per_step:,} tokens) per step; precision "
                 f"{resolved['precision']}")
    print_run_description(fabric, resolved)
    fabric.print(f"data: {sampler.describe()}")
    documents_of = document_splitter(fabric, args, sampler, val_sampler, resolved["precision"], config.sliding_window)
    fabric.print(MFU_CONVENTION + ("" if peak else " (n/a: no peak FLOP/s for this device)"))

    loader = make_loader(sampler, start_step, args.global_batch_size, args.micro_batch_size, rank, world,
                         end_step, args.num_workers)
    batches = iter(loader)
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=args.max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    engine = Engine(fabric, model, optimizer, grad_clip=args.grad_clip, max_skipped_steps=args.max_skipped_steps,
                    skipped_steps=int(train_state["skipped_steps"]),
                    stop_hint=f"Stopping without saving; resume from the last checkpoint in {ckpt_root} with a "
                              f"lower --lr or check the data.")
    meter = Throughput(fabric.device)

    def save(step_done: int) -> Path | None:
        if args.no_save:
            return None
        with meter.paused():  # saving is not training throughput
            path = save_training_checkpoint(fabric, ckpt_root, step_done, model, optimizer, dict(train_state),
                                            config, run_args, tokenizer=tokenizer_source, keep_last=args.keep_last)
        fabric.print(f"saved checkpoint {path}")
        return path

    def micro_loss(step_number: int):
        def loss_fn(_micro):
            t0 = time.perf_counter()
            x, y = next(batches)
            x, y = x.to(fabric.device, non_blocking=True), y.to(fabric.device, non_blocking=True)
            meter.add_data_wait(time.perf_counter() - t0)
            loss = model(x, targets=y, documents=documents_of(x))
            if step_number in nan_steps:
                loss = loss * float("nan")
            if step_number in inf_grad_steps:
                # The loss stays finite (~1e31) while the squares of the gradients overflow fp32:
                # a finite loss with an infinite gradient norm, which must be skipped too.
                loss = loss * 1e30
            # Equal-length windows with no ignored tokens: the mean of micro-batch means is the
            # global mean, so each backward gets loss/accum (FSDP averages over the ranks).
            return loss / accum, {"loss": loss}
        return loss_fn

    last_saved = start_step if resume_path is not None else None
    window: list = []  # this log window's StepResults, read at log time (nothing waits for the device before)
    step, exit_reason = start_step, "done"
    model.train()
    try:
        while step < end_step:
            profiler = StepProfiler(out, rank) if args.profile_step == step + 1 else None
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, decay_steps)
            # The stop flag rides in the step's all-reduced statistics: every rank reads the same
            # sum one step later and stops at the same step boundary, with no collective of its own.
            result = engine.step(range(accum), micro_loss(step + 1), lr, step_number=step + 1,
                                 flags={"stop": 1.0 if stop.received else 0.0})
            window.append(result)
            if fp8_all_gather:
                fp8.after_optimizer_step(model, fp8_all_gather)
            step += 1
            train_state.update(step=step, tokens_seen=train_state["tokens_seen"] + tokens_per_step,
                               next_sample_index=step * args.global_batch_size)
            meter.add(tokens_per_step, args.global_batch_size)
            if profiler is not None:
                with meter.paused():  # the profiler's bookkeeping is not training throughput
                    profiler.finish(fabric, step)
            if signal_here and step == int(signal_step):
                os.kill(os.getpid(), signal.Signals[signal_name])

            if step % args.log_every == 0 or step == end_step:
                engine.settle()  # counts this step's skip (or stops the run) before it is logged
                train_state["skipped_steps"] = engine.skipped_steps
                rate = meter.read()
                tps = rate["tokens_per_sec"]
                window_losses = [r.sums["loss"] / (accum * world) for r in window if not r.skipped]
                metrics = {
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "lr": lr, "grad_norm": result.grad_norm,
                    "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / world,
                    **mfu_metrics(config, block, tps, world, peak),
                    **memory_metrics(fabric.device),
                    "data_wait_share": rate["data_wait_share"],
                    "tokens_seen": train_state["tokens_seen"], "skipped_steps": train_state["skipped_steps"],
                    **sampler.source_epochs(train_state["next_sample_index"]),  # epoch/<k>: passes over source k
                }
                if args.compile:
                    metrics.update(graph_breaks=graph_breaks(), compiled_graphs=compiled_graphs())
                logger.log(metrics, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                         mfu="n/a" if peak is None else f"{metrics['mfu']:.1%}",
                                         mem=f"{metrics['peak_memory_gb']:.1f}GB", refresh=False)
                window = []
            if progress is not None:
                progress.update(1)

            if val_sampler is not None and (step % args.val_every == 0 or step == args.max_steps):
                with meter.paused():  # validation is not training throughput
                    val_loss = validate(fabric, model, val_sampler, args, documents_of)
                logger.log({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}, step)
                fabric.print(f"step {step}: validation loss {val_loss:.4f}")

            if step % args.save_every == 0 and step != end_step:
                engine.settle()
                train_state["skipped_steps"] = engine.skipped_steps
                save(step)
                last_saved = step
            settled = engine.settled  # the step before this one (or this one, after a log or save)
            if settled is not None and settled.flags["stop"] > 0:
                exit_reason = "signal"
                break
    finally:
        if progress is not None:
            progress.close()
    engine.settle()
    train_state["skipped_steps"] = engine.skipped_steps

    if args.compile:
        fabric.print(f"torch.compile: {compiled_graphs()} graph(s) compiled, {graph_breaks()} graph break(s)")
    if last_saved != step:
        save(step)
    if exit_reason == "signal" and args.no_save:
        fabric.print(f"received a stop signal at step {step}; --no-save: nothing saved")
    elif exit_reason == "signal":
        fabric.print(f"received a stop signal: saved {ckpt_root / step_dir_name(step)}; continue with --resume auto")
    elif step >= args.max_steps and not args.no_save:
        save_consolidated(fabric, model, out / "final", tokenizer=tokenizer_source)
        fabric.print(f"training finished: {step} steps, {train_state['tokens_seen']:,} tokens; "
                     f"consolidated model in {out / 'final'}")
    elif step >= args.max_steps:
        fabric.print(f"training finished: {step} steps, {train_state['tokens_seen']:,} tokens; --no-save: "
                     f"nothing written but {out / 'metrics.jsonl'} and {out / 'config.yaml'}")
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
