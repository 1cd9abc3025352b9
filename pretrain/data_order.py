"""The pretraining data order as arithmetic: which source sample i comes from, and which
window of that source it reads. Both are pure functions of (seed, i), with no state and no
table that grows with the corpus, so any rank or loader worker can compute any sample.

SourceInterleave: the mixture as an exact, deterministic interleave. Weights are read as
the decimals they were written as and turned into integers a_0 .. a_{K-1} with sum D (0.7 :
0.3 becomes 7 : 3, D = 10). Sample t (1-based) goes to a source chosen by Tijdeman's
earliest-deadline rule: among the sources that may take another sample without running
more than 1 - σ ahead of t·w_s (σ = 1 / (2K - 2)), the one whose next sample falls due
first, ties to the lower index. Its guarantee: after every n samples each source has
|count_s(n) - n·w_s| <= 1 - σ < 1. For two sources (σ = 1/2) this is Bresenham's line, the
rule "the source furthest behind n·w_s goes next": count_0(n) = floor(n·w_0 + 1/2). For six
or more sources that simpler rule can drift more than one sample from n·w_s, which is why the
deadline form is used. After D samples every count is exactly n·w_s, so the order repeats
with period D: one pass over a period at construction gives, for every i in O(1), the source
and the number of earlier samples of the same source.

WindowPermutation: a keyed bijection of [0, N), computed per index, that shuffles the
order in which a source's N windows are read. A balanced Feistel network permutes
[0, 4^h) with 4^h >= N (at most 4N); an output outside [0, N) is fed through the network
again (cycle-walking), which restricts the bijection to [0, N). The round keys come from
(seed, source, epoch), so every epoch of every source has its own order.
"""
from __future__ import annotations

import array
import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

# A period longer than this means weights written with many digits (0.333333 : 0.666667);
# the table costs ten bytes per sample of the period and one loop step each to build.
MAX_PERIOD = 1_000_000
FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1


def integer_weights(weights) -> list[int]:
    """The smallest integers in the proportions of `weights`, each read as the decimal it
    prints as (repr), so 0.7 : 0.3 is exactly 7 : 3 rather than two binary fractions."""
    if not weights:
        raise ValueError("no weights given")
    fractions = []
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"weight {w!r} must be a positive finite number")
        fractions.append(Fraction(repr(float(w))))
    common = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * common) for f in fractions]
    divisor = math.gcd(*ints)
    return [n // divisor for n in ints]


class SourceInterleave:
    """Sample index -> (source, number of earlier samples of that source); see module docstring."""

    def __init__(self, weights):
        self.counts = integer_weights(weights)  # samples of each source in one period
        self.period = sum(self.counts)
        if self.period > MAX_PERIOD:
            raise ValueError(f"weights {list(weights)} are in the proportions {' : '.join(map(str, self.counts))}, "
                             f"whose interleave repeats only every {self.period:,} samples (limit {MAX_PERIOD:,}); "
                             f"write the weights with fewer digits, e.g. 7:3 or 0.7:0.3")
        self._source, self._rank = self._one_period(self.counts)

    @staticmethod
    def _one_period(a: list[int]) -> tuple[array.array, array.array]:
        k, d = len(a), sum(a)
        m = max(2 * k - 2, 1)  # σ = 1/m; everything is scaled by m·d to stay in integers
        counts = [0] * k
        source, rank = array.array("H" if k < 1 << 16 else "L"), array.array("q")
        for t in range(1, d + 1):
            best = -1
            for s in range(k):
                c = counts[s]
                # May take sample c+1 at time t: c + 1 <= t·w_s + 1 - σ. Due by (c + 1 - σ) / w_s.
                if t * a[s] * m >= (c * m + 1) * d and \
                        (best < 0 or ((c + 1) * m - 1) * a[best] < ((counts[best] + 1) * m - 1) * a[s]):
                    best = s
            if best < 0:
                raise RuntimeError(f"interleave of {a}: no source eligible at sample {t} (a bug: Tijdeman's "
                                   f"theorem says one always is)")
            source.append(best)
            rank.append(counts[best])
            counts[best] += 1
        if counts != a:
            raise RuntimeError(f"interleave of {a}: one period gave counts {counts} (a bug)")
        return source, rank

    def locate(self, index: int) -> tuple[int, int]:
        """(source of sample `index`, how many samples before it came from that source)."""
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        laps, r = divmod(index, self.period)
        s = self._source[r]
        return s, laps * self.counts[s] + self._rank[r]

    def samples_per_source(self, n: int) -> list[int]:
        """How many of samples [0, n) each source has."""
        laps, r = divmod(n, self.period)
        head = np.frombuffer(self._source, dtype=np.dtype(self._source.typecode))[:r]
        return [laps * a + int(np.count_nonzero(head == s)) for s, a in enumerate(self.counts)]


def _mix64(x):
    # splitmix64's finaliser; written so that it works on Python ints and on uint64 arrays alike
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=256)
def _round_keys(seed: int, source: int, epoch: int) -> tuple[int, ...]:
    state = np.random.SeedSequence([seed, source, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)
    return tuple(int(k) for k in state)


class WindowPermutation:
    """A bijection of [0, size) keyed by (seed, source, epoch); see module docstring."""

    def __init__(self, size: int, seed: int, source: int, epoch: int):
        if size < 1:
            raise ValueError(f"a permutation needs at least one element, got size {size}")
        self.size = size
        bits = max((size - 1).bit_length(), 2)
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = _round_keys(seed, source, epoch)

    def _network(self, x):
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, position: int) -> int:
        if not 0 <= position < self.size:
            raise IndexError(f"position {position} is outside [0, {self.size})")
        x = self._network(position)
        while x >= self.size:
            x = self._network(x)
        return x

    def many(self, positions: np.ndarray) -> np.ndarray:
        """The same map on an array of positions (uint64 arithmetic), for tests and bulk use."""
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.size:
            raise IndexError(f"positions reach {int(x.max())}, outside [0, {self.size})")
        x = self._network(x)
        outside = np.flatnonzero(x >= self.size)
        while outside.size:
            x[outside] = self._network(x[outside])
            outside = outside[x[outside] >= self.size]
        return x.astype(np.int64)
