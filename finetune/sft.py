"""Supervised fine-tuning on chat data (the "SFT model" SPIN starts from).

    python finetune/sft.py --ckpt PRETRAIN_OUT/final --data CHAT/train.jsonl --out SFT_DIR [--max-steps N]
    fabric run finetune/sft.py ...   (several GPUs/nodes: same Fabric + FSDP2 setup as pretraining)

--ckpt is our consolidated directory, a pretraining checkpoint or an HF Llama directory
(detected automatically). Each row is the first user turn + assistant answer, templated by
finetune/chat.py; the loss covers the answer tokens (and its EOS) only.

Output:
    SFT_DIR/final/        config.json, model.safetensors, tokenizer.model, chat_template.{json,jinja}
    SFT_DIR/metrics.jsonl one line per optimizer step (loss, lr, tokens/s, ...) + a final summary
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.batching import check_batch_sizes, epoch_batches, lr_at, rank_micro_batches
from finetune.chat import IGNORE_INDEX, ChatEncoder, pad_right, read_chat, sft_row
from finetune.checkpoints import load_start, save_finetuned
from finetune.runtime import MetricsLogger, build_fabric, clip_grad_norm, setup_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="pretrained checkpoint directory")
    p.add_argument("--data", type=Path, required=True, help="UltraChat-format .jsonl or .parquet")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--tokenizer", type=Path, help="sentencepiece .model; overrides CKPT/tokenizer.model")
    p.add_argument("--num-examples", type=int, help="use only the first N rows")
    p.add_argument("--max-seq-len", type=int, help="default: the model's block_size")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default=None, help="bf16-mixed or 32-true (default: bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--wandb-project", help="also log to this W&B project (offline by default)")
    p.add_argument("--wandb-mode", default="offline")
    for action in p._actions:  # show every default in --help, not only of flags with a help text
        if action.help is None:
            action.help = " "
    return p.parse_args(argv)


def tokenize_rows(examples, encoder: ChatEncoder, max_len: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for ex in examples:
        rows.append(sft_row(*encoder.encode_example(ex.prompt, ex.response, max_len)))
    return rows


def collate(rows, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(pad_right([r[0] for r in rows], pad_id), device=device)
    labels = torch.tensor(pad_right([r[1] for r in rows], IGNORE_INDEX), device=device)
    return ids, labels


def run(args: argparse.Namespace) -> Path:
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    fabric = build_fabric(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                          precision=args.precision)
    fabric.launch()
    fabric.seed_everything(args.seed)

    model, tok, template = load_start(args.ckpt, args.tokenizer, args.kernels)
    max_len = args.max_seq_len or model.config.block_size
    if max_len > model.config.block_size:
        raise ValueError(f"--max-seq-len {max_len} exceeds the model's block_size {model.config.block_size}")
    encoder = ChatEncoder(tok, template)
    examples = read_chat(args.data, limit=args.num_examples)
    rows = tokenize_rows(examples, encoder, max_len)
    check_batch_sizes(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    steps_per_epoch = len(epoch_batches(len(rows), args.global_batch_size, args.seed, 0))
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps

    model = setup_model(fabric, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)
    logger = MetricsLogger(args.out, enabled=fabric.global_rank == 0, wandb_project=args.wandb_project,
                           wandb_mode=args.wandb_mode, run_config=vars(args) | {"stage": "sft"})
    fabric.print(f"SFT: {len(rows)} rows ({encoder.stats.prompts_truncated} prompts and "
                 f"{encoder.stats.responses_truncated} responses truncated to {max_len} tokens), "
                 f"{total_steps} steps of {args.global_batch_size} rows, {fabric.world_size} device(s)")

    step, t0, tokens_seen = 0, time.perf_counter(), 0
    bar = tqdm(total=total_steps, desc="sft", disable=fabric.global_rank != 0)
    model.train()
    for epoch in range(args.epochs):
        for batch in epoch_batches(len(rows), args.global_batch_size, args.seed, epoch):
            if step >= total_steps:
                break
            lr = lr_at(step, total_steps, args.lr, args.warmup_ratio, args.lr_schedule, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every rank knows the whole global batch, so the token-weighted mean needs no communication.
            global_targets = sum(len(rows[i][1]) - rows[i][1].count(IGNORE_INDEX) for i in batch)
            loss_sum = 0.0
            for micro in rank_micro_batches(batch, fabric.global_rank, fabric.world_size, args.micro_batch_size):
                ids, labels = collate([rows[i] for i in micro], tok.pad_id, fabric.device)
                n = int((labels != IGNORE_INDEX).sum())
                loss = model(ids, targets=labels)
                # mean over the micro-batch -> sum -> share of the global mean; x world_size
                # because FSDP averages gradients over ranks.
                scaled = loss * n / max(global_targets, 1) * fabric.world_size
                fabric.backward(scaled)
                loss_sum += loss.item() * n
                tokens_seen += int(ids.numel())
            grad_norm = clip_grad_norm(model, args.grad_clip) \
                if args.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            local_loss = torch.tensor(loss_sum, device=fabric.device)
            mean_loss = float(fabric.all_reduce(local_loss, reduce_op="sum")) / max(global_targets, 1)
            elapsed = time.perf_counter() - t0
            metrics = {"loss": mean_loss, "lr": lr, "epoch": epoch,
                       "tokens_per_s": tokens_seen * fabric.world_size / elapsed}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            if step % args.log_every == 0 or step == total_steps:
                logger.log(metrics, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
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
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
