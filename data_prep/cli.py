"""Command-line plumbing shared by tokenize_slimpajama.py and tokenize_starcoder.py."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.pipeline import DEFAULT_SHARD_TOKENS, Job, run
from data_prep.tokenize_file import DTYPE_CHOICES


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="root of the data set")
    p.add_argument("--output", required=True, type=Path,
                   help="output directory for this source (and split): shards + summary.json")
    p.add_argument("--tokenizer", required=True, type=Path, help="a sentencepiece .model, an HF tokenizer.json, "
                   "or a directory holding one (with its tokenizer_config.json)")
    p.add_argument("--eos-token", help="the token that ends each document (default: the tokenizer's eos_token; "
                   "e.g. '<|endoftext|>' for a chat tokenizer whose eos_token is its end-of-turn <|im_end|>)")
    p.add_argument("--workers", type=_positive_int, default=_default_workers(),
                   help="tokenizer processes (input files are tokenized in parallel)")
    p.add_argument("--shard-tokens", type=_positive_int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard (the last shard holds the rest)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="token id type in the shards; auto = uint16 when the vocabulary fits")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad documents/files and count them in summary.json instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(source: str, args: argparse.Namespace, split: str | None = None) -> int:
    job = Job(source=source, input_root=args.input, output=args.output, tokenizer=args.tokenizer,
              split=split, workers=args.workers, shard_tokens=args.shard_tokens, skip_bad=args.skip_bad,
              dtype=args.dtype, progress=not args.no_progress, eos_token=args.eos_token)
    try:
        summary = run(job)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume into {args.output}", file=sys.stderr)
        return 130
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped_documents"].items()) or "none"
    excluded = ", ".join(f"{k}={v}" for k, v in summary["excluded_documents"].items()) or "none"
    state = "already complete" if summary.get("already_complete") else f"{summary['seconds']:.1f}s"
    print(f"{job.prefix}: {summary['files']} files, {summary['documents']:,} documents, "
          f"{summary['tokens']:,} tokens in {len(summary['shards'])} shards ({state}); "
          f"skipped: {skipped}; excluded: {excluded} -> {args.output}")
    return 0
