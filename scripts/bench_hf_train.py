"""Training throughput of transformers' LlamaForCausalLM on our config and data, for the
same-GPU comparison in scripts/gpu_bench.py (issue 26: ours >= 1.3x transformers + Liger).

    python scripts/bench_hf_train.py --config tinyllama-1.1b --data DIR:0.7 DIR:0.3 --micro-batch 8 \
        --accumulation 4 --liger --compile --json OUT.json

The model is `LlamaForCausalLM` built from `model.hf.config_to_hf` (the same shapes as ours,
random weights), trained the way HF users train in bf16: fp32 weights under
`torch.autocast(bfloat16)`, fused AdamW (lr 4e-4, betas 0.9/0.95, wd 0.1), clip 1.0,
SDPA attention. `--liger` applies Liger-Kernel's Llama patches (RMSNorm, RoPE, SwiGLU, fused
linear + cross-entropy) before the model is built; `--compile` wraps it in torch.compile.
The windows are read by our MixtureSampler from the same shards, in the same order. On CPU
(the smoke run) it trains in fp32 without autocast. It writes tokens/s (median of the steps
after the warm-up), the losses and peak memory to --json; a missing Liger-Kernel is exit 2
with the reason, which gpu_bench.py records as the row's status.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tinyllama-1.1b")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR:WEIGHT")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps, the warm-up included")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the median")
    p.add_argument("--liger", action="store_true", help="Liger-Kernel's Llama patches")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as e:
            print(f"bench_hf_train.py: --liger needs Liger-Kernel ({e}); pip install liger-kernel", file=sys.stderr)
            return 2
        apply_liger_kernel_to_llama()  # patches the classes: must come before the model is built
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import Config
    from model.hf import config_to_hf
    from pretrain.data import MixtureSampler, parse_source

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = Config.from_name(args.config, **({"block_size": args.block_size} if args.block_size else {}))
    hf = config_to_hf(config, torch.float32)
    hf_config = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_model = torch.compile(model) if args.compile else model
    sampler = MixtureSampler([parse_source(s) for s in args.data], config.block_size, 0, config.vocab_size)
    per_step = args.micro_batch * args.accumulation
    tokens_per_step = per_step * config.block_size
    times, losses = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for m in range(args.accumulation):
            first = step * per_step + m * args.micro_batch
            x, y = sampler.batch(list(range(first, first + args.micro_batch)))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # HF shifts the labels itself (logits at t predict labels at t + 1): labels are the
            # window's targets moved one place right (the last target of a window is not trained).
            labels = torch.cat([x[:, :1], y[:, :-1]], dim=1)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                # with labels, Liger's patched forward runs its fused linear + cross-entropy
                loss = step_model(input_ids=x, labels=labels).loss
            (loss / args.accumulation).backward()
            total += loss.detach() / args.accumulation
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # the host waits here, as HF's Trainer does when it logs every step
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = times[args.warmup_steps:] or times
    result = dict(config=args.config, block_size=config.block_size, micro_batch=args.micro_batch,
                  accumulation=args.accumulation, liger=args.liger, compile=args.compile,
                  tokens_per_s=tokens_per_step / statistics.median(measured), step_s=statistics.median(measured),
                  losses=losses, device=torch.cuda.get_device_name() if cuda else "cpu",
                  peak_alloc_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                  peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else None)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.json)
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "step_s", "peak_reserved_gb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
