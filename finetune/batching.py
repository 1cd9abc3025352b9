"""Data order and per-rank micro-batches shared by sft.py and spin.py (the schedule: pretrain/schedule.py).

The order is a pure function of (seed, epoch): a re-run or a different number of GPUs sees the
same global batches. A global batch is split into contiguous per-rank parts, each cut into
micro-batches (gradient accumulation). The last partial global batch of an epoch is dropped
so every rank always does the same number of forward/backward passes (FSDP needs that).
"""
from __future__ import annotations

import random


def check_batch_sizes(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps; a clear error when the sizes do not divide."""
    if global_batch % (micro_batch * world_size):
        raise ValueError(f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size "
                         f"{micro_batch} x {world_size} device(s)")
    return global_batch // (micro_batch * world_size)


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    if n < global_batch:
        raise ValueError(f"only {n} training rows but --global-batch-size is {global_batch}; "
                         f"lower the batch size or add data")
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]


def rank_micro_batches(batch: list[int], rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    per_rank = len(batch) // world_size
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
