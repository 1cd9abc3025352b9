"""The pretraining data: a weighted mixture of token-shard directories, read by sample index.

Sample i of a run is a window of `block_size + 1` tokens and a pure function of (seed, i):

    source s, j = interleave.locate(i)      exact 7:3 (or any weights) at every prefix; j is the
                                            number of earlier samples of s (pretrain/data_order.py)
    epoch, p    = divmod(j, N_s)            N_s = windows of s; every window once per epoch
    window      = permutation(s, epoch)(p)  keyed Feistel bijection of [0, N_s), new key per epoch
    start       = window · block_size       in s's shards taken in name order as one stream

Windows step by block_size and so overlap by one token: window w is tokens
[w·T, w·T + T + 1) with T = block_size, its inputs the first T and its targets the last T.
That way every token of the stream after the first is a target exactly once per epoch (with
windows of T + 1 side by side, one token in T + 1 would never be predicted). A window may
run from one shard into the next: data_prep cuts one stream into shards mid-document, so a
shard boundary is not a document boundary and there are no shard tails to drop or pad. The
only tokens outside every window are the stream's last (num_tokens - 1) mod T; nothing is
ever padded.

There is no state to carry between samples, so every rank and every loader worker reads
only its own indices, resuming is "start at index N", and a run on 1 or on 2 processes
sees the same global batches. Global batch g holds the indices [g·B, (g+1)·B). Rank r of W
takes the contiguous slice [g·B + r·B/W, g·B + (r+1)·B/W) and splits it into micro-batches
of `micro_batch_size`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.shards import list_shards, read_header
from pretrain.data_order import SourceInterleave, WindowPermutation
from pretrain.shard_stream import ShardStream


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
    """All shards of one directory as one token stream cut into windows (see module docstring)."""

    def __init__(self, directory: Path, block_size: int, vocab_size: int):
        self.directory = directory
        if not directory.is_dir():
            raise DataError(f"data directory {directory} does not exist (expected token shards written by data_prep)")
        paths = list_shards(directory)
        if not paths:
            raise DataError(f"data directory {directory} has no *.bin token shards")
        shards = []
        for path in paths:
            header = read_header(path)
            if header.vocab_size > vocab_size:
                raise DataError(f"{path}: shard vocab_size {header.vocab_size} exceeds the model's vocab_size "
                                f"{vocab_size}; pass --vocab-size {header.vocab_size} (or a larger value)")
            shards.append((path, header))
        self.num_shards = len(shards)
        self.eos_ids = sorted({header.eos_id for _, header in shards})
        self.stream = ShardStream(shards)
        self.num_tokens = self.stream.num_tokens
        if self.num_tokens < block_size + 1:
            raise DataError(f"data directory {directory}: its shards hold {self.num_tokens} tokens in all, fewer than "
                            f"one window of {block_size + 1} (block size + 1); lower --block-size or prepare more data")
        self.num_windows = (self.num_tokens - 1) // block_size


class MixtureSampler:
    """Maps a global sample index to its window of block_size + 1 tokens (see module docstring)."""

    def __init__(self, sources: list[SourceSpec], block_size: int, seed: int, vocab_size: int):
        if not sources:
            raise DataError("no data sources given; pass --data DIR:WEIGHT [DIR:WEIGHT ...]")
        if block_size < 1:
            raise DataError(f"block_size must be at least 1, got {block_size}")
        if seed < 0:
            raise DataError(f"--seed must be non-negative, got {seed}")
        self.block_size = block_size
        self.seed = seed
        self.sources = [_Source(s.directory, block_size, vocab_size) for s in sources]
        try:
            self.interleave = SourceInterleave([s.weight for s in sources])
        except ValueError as e:
            raise DataError(f"--data weights: {e}") from e
        weights = np.asarray(self.interleave.counts, dtype=np.float64)
        self.weights = weights / weights.sum()

    def eos_id(self) -> int:
        """The EOS id that ends every document in every source (attention within documents needs it)."""
        ids = sorted({e for src in self.sources for e in src.eos_ids})
        if len(ids) != 1:
            where = ", ".join(f"{src.directory}: {src.eos_ids}" for src in self.sources)
            raise DataError(f"the shards do not agree on one EOS id ({where}); tokenize every source with the "
                            f"same tokenizer")
        return ids[0]

    def source_and_start(self, index: int) -> tuple[int, int]:
        """(source number, first token of sample `index`'s window in that source's stream)."""
        source, earlier = self.interleave.locate(index)
        windows = self.sources[source].num_windows
        epoch, position = divmod(earlier, windows)
        window = WindowPermutation(windows, self.seed, source, epoch)(position)
        return source, window * self.block_size

    def sample(self, index: int) -> np.ndarray:
        source, start = self.source_and_start(index)
        return self.sources[source].stream.read(start, self.block_size + 1)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(indices), block_size) int64."""
        windows = torch.from_numpy(np.stack([self.sample(int(i)) for i in indices]))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def source_epochs(self, num_samples: int) -> dict[str, float]:
        """After samples [0, num_samples): each source's epochs read, as `epoch/<source number>`
        (0.5 = half its windows once; 2.25 = two full passes and a quarter of the third)."""
        counts = self.interleave.samples_per_source(num_samples)
        return {f"epoch/{k}": c / s.num_windows for k, (c, s) in enumerate(zip(counts, self.sources))}

    def describe(self) -> str:
        parts = [f"[{k}] {s.directory} ({w:.0%}, {s.num_shards} shards, {s.num_tokens:,} tokens, "
                 f"{s.num_windows:,} windows per epoch)" for k, (s, w) in enumerate(zip(self.sources, self.weights))]
        counts = " + ".join(map(str, self.interleave.counts))
        return ", ".join(parts) + f"; the interleave repeats every {self.interleave.period} samples ({counts})"


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
