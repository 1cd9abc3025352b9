"""Supervised fine-tuning on chat data (the "SFT model" SPIN starts from).

    python finetune/sft.py --ckpt PRETRAIN_OUT/final --data CHAT/train.jsonl --out SFT_DIR [--max-steps N]
    fabric run finetune/sft.py ...   (several GPUs/nodes: same Fabric + FSDP2 setup as pretraining)

--ckpt is our consolidated directory, a pretraining checkpoint or an HF Llama directory
(detected automatically). Each row is the first user turn + assistant answer, in --ckpt's own
chat template: an HF directory's Jinja template when it has one (finetune/hf_chat.py), else
ours (finetune/chat.py); the loss covers the answer tokens (and its end-of-turn token: EOS, or
the template's, e.g. <|im_end|>) only.

Output:
    SFT_DIR/final/        config.json, model.safetensors, the tokenizer's files (tokenizer.model or
                          tokenizer.json, + its JSON files), the chat template (ours:
                          chat_template.{json,jinja}; an HF one: chat_template.jinja +
                          tokenizer_config.json)
    SFT_DIR/config.yaml   the resolved options and backends (--run-config runs it again)
    SFT_DIR/metrics.jsonl one line per optimizer step (loss, lr, tokens/s, MFU, ...) + a final summary;
                      with --val-data, a val_loss line before training and after each epoch
    SFT_DIR/epoch{k}/     with --save-every-epoch, the model after epoch k (< --epochs)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.batching import check_batch_sizes, epoch_batches, rank_micro_batches
from finetune.chat import IGNORE_INDEX, ChatEncoder, pad_right, read_chat, sft_row
from finetune.checkpoints import load_start, save_finetuned
from finetune.hf_chat import chat_encoder
from finetune.options import FinetuneOptions
from pretrain.engine import (Engine, Throughput, TrainingError, build_optimizer, memory_metrics,
                             mfu_metrics, print_run_description, run_description, setup_fabric)
from pretrain.metrics import MetricsLogger, peak_flops_per_second
from pretrain.options import as_dict, opt, parse_options, script_name, write_run_config
from pretrain.schedule import SHAPES, lr_at, warmup_steps_from_ratio


@dataclass(kw_only=True)
class SFTOptions(FinetuneOptions):
    """Every option of finetune/sft.py (the shared ones: finetune/options.py, pretrain/engine.py)."""

    num_examples: int | None = opt(None, "use only the first N rows", minimum=1)
    max_seq_len: int | None = opt(None, "default: the model's block_size", minimum=2)
    epochs: int = opt(1, "passes over the data", minimum=1)
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    global_batch_size: int = opt(64, "rows per optimizer step, all ranks", minimum=1)
    micro_batch_size: int = opt(4, "rows per forward/backward per rank", minimum=1)
    lr: float = opt(2e-5, "peak learning rate", minimum=0)
    lr_schedule: str = opt("cosine", "decay after the warmup", choices=SHAPES)
    min_lr_ratio: float = opt(0.0, "final learning rate as a share of --lr", minimum=0)
    warmup_ratio: float = opt(0.1, "linear warmup over this share of the steps", minimum=0)
    weight_decay: float = opt(0.0, "AdamW weight decay of the matrices", minimum=0)
    seed: int = opt(1234, "seeds the data order")
    val_data: Path | None = opt(None, "held-out chat rows (.jsonl/.parquet): their mean loss per answer token is "
                                      "logged as val_loss before training and after every epoch")
    save_every_epoch: bool = opt(False, "also keep the model after each epoch but the last, as SFT_DIR/epoch{k}")
    log_every: int = opt(1, "log metrics every N optimizer steps", minimum=1)

    def problems(self) -> list[str]:
        return [f"--min-lr-ratio must be <= 1, got {self.min_lr_ratio}"] if self.min_lr_ratio > 1 else []


def parse_args(argv=None) -> SFTOptions:
    return parse_options(SFTOptions, argv, description=__doc__.split("\n\n")[0],
                         epilog="Every run writes its resolved options to OUT/config.yaml; "
                                "`python finetune/sft.py --run-config OUT/config.yaml` runs it again.")


def tokenize_rows(examples, encoder: ChatEncoder, max_len: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for ex in examples:
        rows.append(sft_row(*encoder.encode_example(ex.prompt, ex.response, max_len)))
    return rows


def collate(rows, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(pad_right([r[0] for r in rows], pad_id), device=device)
    labels = torch.tensor(pad_right([r[1] for r in rows], IGNORE_INDEX), device=device)
    return ids, labels


def n_targets(row) -> int:
    return len(row[1]) - row[1].count(IGNORE_INDEX)


@torch.no_grad()
def held_out_loss(fabric, model, rows, pad_id: int, micro_batch_size: int) -> float:
    """Mean loss per answer token over `rows` (every rank takes its share, then one all-reduce).

    Every rank runs the same number of forwards, because each FSDP forward all-gathers the
    weights: a rank whose share has run out feeds one row with zero weight.
    """
    world, rank = fabric.world_size, fabric.global_rank
    loss_sum, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), micro_batch_size * world):
        mine = rows[start:start + micro_batch_size * world][rank::world]
        ids, labels = collate(mine or rows[:1], pad_id, fabric.device)
        loss = model(ids, targets=labels)
        if mine:
            n = sum(n_targets(r) for r in mine)
            loss_sum, count = loss_sum + float(loss) * n, count + n
    model.train(was_training)
    sums = fabric.all_reduce(torch.tensor([loss_sum, count], dtype=torch.float64, device=fabric.device),
                             reduce_op="sum")
    return float(sums[0] / sums[1].clamp(min=1))


def run(args: SFTOptions) -> Path:
    # An unsupported or unreadable --ckpt, a tokenizer that does not fit its embedding and a
    # template that cannot be split are refused before any process or file is made (the model
    # on the meta device: nothing read yet).
    _, tok, template = load_start(args.ckpt, args.tokenizer, args.kernels, weights=False)
    encoder = chat_encoder(tok, template)
    fabric = setup_fabric(args, activation_checkpointing=args.activation_checkpointing, seed=args.seed)
    # Sharded as it is read: no rank ever holds the whole model (pretrain/sharded_load.py).
    model = load_start(args.ckpt, args.tokenizer, args.kernels, fabric=fabric)[0]
    max_len = args.max_seq_len or model.config.block_size
    if max_len > model.config.block_size:
        raise ValueError(f"--max-seq-len {max_len} exceeds the model's block_size {model.config.block_size}")
    fabric.print(f"chat template: {template.describe()}")
    examples = read_chat(args.data, limit=args.num_examples)
    rows = tokenize_rows(examples, encoder, max_len)
    val_rows = tokenize_rows(read_chat(args.val_data), encoder, max_len) if args.val_data else None
    check_batch_sizes(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    steps_per_epoch = len(epoch_batches(len(rows), args.global_batch_size, args.seed, 0))
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps

    config = model.config
    optimizer = build_optimizer(fabric, model, name="adamw", lr=args.lr, weight_decay=args.weight_decay)
    resolved = run_description(fabric, model, args.kernels) | {"chat_template": template.describe()}
    if fabric.global_rank == 0:
        write_run_config(args.out, script_name(__file__), args, resolved)
    logger = MetricsLogger(args.out, enabled=fabric.global_rank == 0, wandb_project=args.wandb_project,
                           wandb_mode=args.wandb_mode, run_config=as_dict(args) | {"stage": "sft"})
    fabric.print(f"SFT: {len(rows)} rows ({encoder.stats.prompts_truncated} prompts and "
                 f"{encoder.stats.responses_truncated} responses truncated to {max_len} tokens), "
                 f"{total_steps} steps of {args.global_batch_size} rows, {fabric.world_size} device(s)")
    print_run_description(fabric, resolved)

    engine = Engine(fabric, model, optimizer, grad_clip=args.grad_clip, max_skipped_steps=args.max_skipped_steps,
                    stop_hint="Stopping without saving; lower --lr or check the data.")
    meter = Throughput(fabric.device)
    peak = peak_flops_per_second(fabric.device)
    warmup = warmup_steps_from_ratio(args.warmup_ratio, total_steps)
    world = fabric.world_size
    step = 0
    bar = tqdm(total=total_steps, desc="sft", disable=fabric.global_rank != 0)

    def validate(epochs_done: int) -> None:
        if val_rows is None:
            return
        with meter.paused():
            val_loss = held_out_loss(fabric, model, val_rows, tok.pad_id, args.micro_batch_size)
        logger.log({"val_loss": val_loss, "epochs_done": epochs_done}, step=step)
        if fabric.global_rank == 0:
            bar.write(f"after {epochs_done} epoch(s): val_loss {val_loss:.4f} over {len(val_rows)} rows")

    validate(0)
    model.train()
    for epoch in range(args.epochs):
        for batch in epoch_batches(len(rows), args.global_batch_size, args.seed, epoch):
            if step >= total_steps:
                break
            lr = lr_at(step, args.lr, args.lr * args.min_lr_ratio, warmup, total_steps, args.lr_schedule)
            # Every rank knows the whole global batch, so the token-weighted mean needs no communication.
            global_targets = max(sum(n_targets(rows[i]) for i in batch), 1)
            micro_batches = rank_micro_batches(batch, fabric.global_rank, world, args.micro_batch_size)

            def loss_fn(micro):
                ids, labels = collate([rows[i] for i in micro], tok.pad_id, fabric.device)
                meter.add(int(ids.numel()) * world, len(micro) * world)  # padded tokens, rank 0 x world
                n = sum(n_targets(rows[i]) for i in micro)  # from the host lists: no device sync
                loss = model(ids, targets=labels)
                # micro-batch mean -> sum -> share of the global mean; x world_size because FSDP
                # averages gradients over ranks.
                return loss * n / global_targets * world, {"loss_sum": loss.detach() * n}

            result = engine.step(micro_batches, loss_fn, lr, step_number=step + 1)
            engine.settle()  # the bar shows this step's loss anyway, so count its skip now
            step += 1
            mean_loss = result.sums["loss_sum"] / global_targets
            if step % args.log_every == 0 or step == total_steps:
                rate = meter.read()
                metrics = {"loss": mean_loss, "lr": lr, "epoch": epoch, "grad_norm": result.grad_norm,
                           "tokens_per_sec": rate["tokens_per_sec"],
                           **mfu_metrics(config, rate["mean_seq_len"], rate["tokens_per_sec"], world, peak),
                           **memory_metrics(fabric.device), "skipped_steps": engine.skipped_steps}
                logger.log(metrics, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if step < (epoch + 1) * steps_per_epoch:
            break                       # --max-steps ended training inside this epoch
        validate(epoch + 1)
        if args.save_every_epoch and epoch + 1 < args.epochs:
            with meter.paused():
                save_finetuned(fabric, model, args.out / f"epoch{epoch + 1}", tok, template)
    bar.close()
    out = save_finetuned(fabric, model, args.out / "final", tok, template)
    logger.log({"final": True, **encoder.stats.as_dict(), "rows": len(rows)}, step=step)
    logger.close()
    fabric.print(f"saved {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
