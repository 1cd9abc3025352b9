"""The learning-rate schedule of all three stages: linear warmup, then a decay to a floor.

Pretraining uses TinyLlama's recipe (cosine to min_lr); SFT and SPIN pick cosine, linear or
constant and give the warmup as a share of their steps (`warmup_steps_from_ratio`). The rate
is a pure function of the optimizer step, so nothing about it needs to be saved: a resumed
run recomputes it from the step it continues at.
"""
from __future__ import annotations

import math

SHAPES = ("cosine", "linear", "constant")


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
          shape: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Steps 0..warmup-1 rise linearly to max_lr (step 0 already gets max_lr/warmup, not zero,
    so the first update is not wasted); then `shape` goes from max_lr down to min_lr at
    `decay_steps` (cosine or linear), and min_lr after that; "constant" stays at max_lr.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown --lr-schedule {shape!r}; use {', '.join(SHAPES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if shape == "constant":
        return max_lr
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if shape == "cosine":
        return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return min_lr + (max_lr - min_lr) * (1.0 - progress)


def warmup_steps_from_ratio(ratio: float, total_steps: int) -> int:
    """Warmup given as a share of the run (SFT/SPIN's --warmup-ratio)."""
    return int(round(ratio * total_steps))
