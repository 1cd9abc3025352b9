"""The pretraining data: a weighted mixture of token-shard directories, read memory-mapped.

Sample i of a run is a window of `block_size + 1` tokens and is a pure function of
(seed, i), computed from `np.random.default_rng([seed, i])`:

    u      = rng.random()                 -> source s = first s with u < cumulative_weight[s]
    start  = rng.integers(num_starts[s])  -> a window start, uniform over every position of
                                             every shard of s that has block_size+1 tokens after it

There is no state to carry between samples, so every rank and every loader worker reads
only its own indices, resuming is "start at index N", and a run on 1 or on 2 processes
sees the same global batches. Windows are drawn with replacement (a window never straddles
two shards); at TinyLlama's scale that is statistically the same as reading the corpus in
a shuffled order.

Global batch g holds the indices [g·B, (g+1)·B). Rank r of W takes the contiguous slice
[g·B + r·B/W, g·B + (r+1)·B/W) and splits it into micro-batches of `micro_batch_size`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.shards import list_shards, read_header, read_shard


class DataError(ValueError):
    """Bad data arguments or shards; the message names the directory or file."""


@dataclass(frozen=True)
class SourceSpec:
    directory: Path
    weight: float


def parse_source(text: str) -> SourceSpec:
    """'DIR:WEIGHT' (or just 'DIR', weight 1). The weight is after the last colon."""
    directory, sep, weight = text.rpartition(":")
    if not sep or not weight or "/" in weight:
        return SourceSpec(Path(text), 1.0)
    try:
        value = float(weight)
    except ValueError:
        raise DataError(f"--data {text!r}: weight {weight!r} is not a number; use DIR:WEIGHT, e.g. data/slimpajama/train:0.7")
    if not value > 0:
        raise DataError(f"--data {text!r}: weight must be positive, got {value}")
    return SourceSpec(Path(directory), value)


class _Source:
    """All shards of one directory that can hold a window, as one range of window starts."""

    def __init__(self, directory: Path, window: int, vocab_size: int):
        self.directory = directory
        if not directory.is_dir():
            raise DataError(f"data directory {directory} does not exist (expected token shards written by data_prep)")
        shards = list_shards(directory)
        if not shards:
            raise DataError(f"data directory {directory} has no *.bin token shards")
        self.paths: list[Path] = []
        starts = []
        for path in shards:
            header = read_header(path)
            if header.vocab_size > vocab_size:
                raise DataError(f"{path}: shard vocab_size {header.vocab_size} exceeds the model's vocab_size "
                                f"{vocab_size}; pass --vocab-size {header.vocab_size} (or a larger value)")
            if header.num_tokens >= window:  # shards shorter than one window are skipped
                self.paths.append(path)
                starts.append(header.num_tokens - window + 1)
        if not self.paths:
            raise DataError(f"data directory {directory}: no shard holds {window} tokens "
                            f"(block size + 1); lower --block-size or prepare more data")
        self.cum_starts = np.cumsum(np.asarray(starts, dtype=np.int64))
        self.num_starts = int(self.cum_starts[-1])
        self.num_tokens = sum(read_header(p).num_tokens for p in self.paths)
        self._maps: list[np.ndarray] | None = None  # opened lazily, so each worker maps its own

    def window(self, position: int, length: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [read_shard(p) for p in self.paths]
        shard = int(np.searchsorted(self.cum_starts, position, side="right"))
        offset = position - (int(self.cum_starts[shard - 1]) if shard else 0)
        return np.asarray(self._maps[shard][offset:offset + length], dtype=np.int64)


class MixtureSampler:
    """Maps a global sample index to its window of block_size + 1 tokens (see module docstring)."""

    def __init__(self, sources: list[SourceSpec], block_size: int, seed: int, vocab_size: int):
        if not sources:
            raise DataError("no data sources given; pass --data DIR:WEIGHT [DIR:WEIGHT ...]")
        self.block_size = block_size
        self.seed = seed
        self.sources = [_Source(s.directory, block_size + 1, vocab_size) for s in sources]
        weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.cum_weights = np.cumsum(self.weights)
        self.cum_weights[-1] = 1.0  # guard against rounding leaving u > last bound

    def source_and_start(self, index: int) -> tuple[int, int]:
        rng = np.random.default_rng([self.seed, index])
        source = int(np.searchsorted(self.cum_weights, rng.random(), side="right"))
        start = int(rng.integers(self.sources[source].num_starts))
        return source, start

    def sample(self, index: int) -> np.ndarray:
        source, start = self.source_and_start(index)
        return self.sources[source].window(start, self.block_size + 1)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(indices), block_size) int64."""
        windows = torch.from_numpy(np.stack([self.sample(int(i)) for i in indices]))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def describe(self) -> str:
        return ", ".join(f"{s.directory} ({w:.0%}, {len(s.paths)} shards, {s.num_tokens:,} tokens)"
                         for s, w in zip(self.sources, self.weights))


def micro_batch_indices(global_step: int, micro_step: int, global_batch: int, micro_batch: int,
                        rank: int, world_size: int) -> range:
    """Global sample indices of micro-batch `micro_step` of rank `rank` in optimizer step `global_step`."""
    per_rank = global_batch // world_size
    first = global_step * global_batch + rank * per_rank + micro_step * micro_batch
    return range(first, first + micro_batch)


class RankMicroBatches(IterableDataset):
    """This rank's micro-batches from optimizer step `start_step` on, in order.

    With DataLoader workers, worker w builds micro-batches w, w+W, ...; the DataLoader
    returns workers' outputs round-robin, so the order is the same as with no workers.
    """

    def __init__(self, sampler: MixtureSampler, start_step: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int, max_steps: int | None = None):
        self.sampler, self.start_step = sampler, start_step
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size, self.max_steps = rank, world_size, max_steps
        self.accum = global_batch // (world_size * micro_batch)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        k = 0  # running micro-batch counter from start_step
        while True:
            step, micro = self.start_step + k // self.accum, k % self.accum
            if self.max_steps is not None and step >= self.max_steps:
                return
            if k % num_workers == worker:
                yield self.sampler.batch(micro_batch_indices(step, micro, self.global_batch, self.micro_batch,
                                                             self.rank, self.world_size))
            k += 1


def make_loader(sampler: MixtureSampler, start_step: int, global_batch: int, micro_batch: int, rank: int,
                world_size: int, max_steps: int | None, num_workers: int) -> DataLoader:
    dataset = RankMicroBatches(sampler, start_step, global_batch, micro_batch, rank, world_size, max_steps)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)


def validation_indices(num_batches: int, micro_batch: int, rank: int, world_size: int) -> list[range]:
    """The fixed validation set: samples [0, num_batches·micro_batch·W) of the validation
    sampler (its own seed), split so rank r evaluates every W-th micro-batch."""
    return [range(b * micro_batch, (b + 1) * micro_batch) for b in range(num_batches * world_size)
            if b % world_size == rank]


def resolve_data_dirs(specs: list[str], data_root: str | os.PathLike | None) -> list[SourceSpec]:
    """--data values, or TinyLlama's default 7:3 SlimPajama/StarCoder mixture under --data-root."""
    if specs:
        return [parse_source(s) for s in specs]
    if data_root is None:
        raise DataError("no training data: pass --data DIR:WEIGHT [...] or --data-root ROOT "
                        "(which must hold slimpajama/train and starcoder/train)")
    root = Path(data_root)
    return [SourceSpec(root / "slimpajama" / "train", 0.7), SourceSpec(root / "starcoder" / "train", 0.3)]
