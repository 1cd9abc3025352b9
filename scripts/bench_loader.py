"""Benchmark the pretraining loader: windows per second that one loader worker delivers.

    python scripts/bench_loader.py [--data DIR:WEIGHT ...] [--block-size 2048] [--micro-batch 8]
                                   [--shards 1000] [--shard-tokens 20480] [--seconds 5] [--json out.json]

Without --data it writes two sources into a temporary directory, 7:3 like TinyLlama, each
--shards shards of --shard-tokens random uint16 ids (many small shards: most windows open a
file that is not in the descriptor LRU, the slow case), and a second mixture of the same
tokens in 4 large shards per source (every read hits an open file). For each mixture it
times, on one CPU thread:

  order only   MixtureSampler.source_and_start: the interleave and the Feistel permutation
  in process   MixtureSampler.batch: order + pread + stacking, what a worker does per micro-batch
  1 worker     a DataLoader with num_workers=1, as pretrain/tinyllama.py builds it (includes
               handing each micro-batch to the main process; timed after the first batch)

The shards were just written, so they are in the page cache: these are the loader's own
costs, not the disk's. A 1.1B model at context 2048 on one H100 consumes about 40 windows/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from data_prep.shards import write_shard  # noqa: E402
from pretrain.data import MixtureSampler, SourceSpec, make_loader, parse_source  # noqa: E402

VOCAB = 32000


def write_mixture(root: Path, shards: int, shard_tokens: int, seed: int = 0) -> list[SourceSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for name, weight in (("slimpajama", 0.7), ("starcoder", 0.3)):
        directory = root / name
        directory.mkdir(parents=True)
        for k in range(shards):
            tokens = rng.integers(0, VOCAB, size=shard_tokens, dtype=np.uint16)
            write_shard(directory / f"{name}_{k:06d}.bin", tokens, vocab_size=VOCAB, eos_id=2, num_docs=0)
        specs.append(SourceSpec(directory, weight))
    return specs


def _timed(step, seconds: float) -> tuple[int, float]:
    """Calls step() (which returns windows done) until `seconds` have passed."""
    done, begin = 0, time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - begin
        if elapsed >= seconds:
            return done, elapsed


def bench(label: str, specs: list[SourceSpec], block_size: int, micro_batch: int, seconds: float) -> list[dict]:
    sampler = MixtureSampler(specs, block_size, seed=42, vocab_size=VOCAB)
    shards = sum(s.num_shards for s in sampler.sources)
    rows = []

    counter = iter(range(10**18))
    def order_only():
        for _ in range(micro_batch):
            sampler.source_and_start(next(counter))
        return micro_batch

    first = iter(range(0, 10**18, micro_batch))
    def in_process():
        start = next(first)
        sampler.batch(range(start, start + micro_batch))
        return micro_batch

    loader = iter(make_loader(sampler, 0, micro_batch, micro_batch, rank=0, world_size=1, max_steps=None,
                              num_workers=1))
    next(loader)  # worker start-up is not throughput
    def one_worker():
        return len(next(loader)[0])

    for mode, step in (("order only", order_only), ("in process", in_process), ("1 worker", one_worker)):
        windows, elapsed = _timed(step, seconds)
        rows.append({"mixture": label, "shards": shards, "mode": mode, "block_size": block_size,
                     "windows_per_sec": windows / elapsed, "tokens_per_sec": windows * block_size / elapsed,
                     "us_per_window": 1e6 * elapsed / windows})
    del loader  # stops the worker
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=None, metavar="DIR:WEIGHT",
                        help="measure these shard directories instead of generated ones")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--shards", type=int, default=1000, help="shards per generated source")
    parser.add_argument("--shard-tokens", type=int, default=20480, help="tokens per generated shard")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    for flag in ("block_size", "micro_batch", "shards", "shard_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    rows = []
    if args.data:
        rows += bench("--data", [parse_source(s) for s in args.data], args.block_size, args.micro_batch, args.seconds)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
            tmp = Path(tmp)
            many = write_mixture(tmp / "many", args.shards, args.shard_tokens)
            rows += bench("many small shards", many, args.block_size, args.micro_batch, args.seconds)
            per_big = args.shards * args.shard_tokens // 4
            few = write_mixture(tmp / "few", 4, per_big)
            rows += bench("4 large shards", few, args.block_size, args.micro_batch, args.seconds)

    print(f"block size {args.block_size}, micro-batch {args.micro_batch}, {args.seconds:g} s per row")
    print(f"{'mixture':<20} {'shards':>7} {'mode':<11} {'windows/s':>10} {'tokens/s':>12} {'us/window':>10}")
    for r in rows:
        print(f"{r['mixture']:<20} {r['shards']:>7} {r['mode']:<11} {r['windows_per_sec']:>10,.0f} "
              f"{r['tokens_per_sec']:>12,.0f} {r['us_per_window']:>10.1f}")
    if args.json:
        tmp_json = args.json.with_name(f".{args.json.name}.tmp")
        tmp_json.write_text(json.dumps(rows, indent=2) + "\n")
        tmp_json.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
