"""The learning-rate schedule: linear warmup, then cosine decay to a floor (TinyLlama's recipe).

The rate is a pure function of the optimizer step, so nothing about it needs to be saved:
a resumed run recomputes it from the step it continues at.
"""
from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Steps 0..warmup-1 rise linearly to max_lr (step 0 already gets max_lr/warmup, not zero,
    so the first update is not wasted); then cosine from max_lr down to min_lr at `decay_steps`,
    and min_lr after that.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    span = max(1, decay_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
