"""Paired tests of two models scored on the same held-out rows (scripts/spin_experiment.py).

    mcnemar_exact(b, c)                 two-sided exact McNemar p-value: b rows only model A got
                                        right, c rows only model B got right (a binomial test of
                                        b against n = b + c at p = 1/2)
    discordant(a, b)                    (b, c) of two 0/1 vectors over the same rows
    paired_bootstrap(a, b, ...)         the accuracy difference A - B and its percentile bootstrap
                                        CI, resampling rows; a and b are per row lists of 0/1 over
                                        seeds (or one value per row), so a row's seeds stay together

Rows are the unit of resampling: the seeds of one setting answer the same rows, so treating
(row, seed) pairs as independent would understate the spread.
"""
from __future__ import annotations

import math
import random


def mcnemar_exact(b: int, c: int) -> float:
    """P(a split at least as uneven as (b, c)) under H0 (each discordant row equally likely
    either way), both tails: min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant(a: list[int], b: list[int]) -> tuple[int, int]:
    """(rows A right and B wrong, rows A wrong and B right)."""
    if len(a) != len(b):
        raise ValueError(f"the two models were scored on {len(a)} and {len(b)} rows")
    return sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))


def _row_means(rows) -> list[float]:
    return [sum(r) / len(r) if isinstance(r, (list, tuple)) else float(r) for r in rows]


def paired_bootstrap(a, b, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of A - B over rows (each row's value: the mean over its seeds) and a percentile
    bootstrap interval from `resamples` resamplings of the rows (seeded, so reproducible)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-empty rows for both models, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(_row_means(a), _row_means(b))]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return {"diff": sum(diffs) / n, "ci_low": lo, "ci_high": hi, "level": level, "resamples": resamples, "rows": n}
