"""Tokenize StarCoder parquet files (column `content`) into token shards.

    python data_prep/tokenize_starcoder.py --input ROOT --output OUT/starcoder \
        --tokenizer tokenizer.model [--workers N] [--shard-tokens N] \
        [--dtype auto|uint16|uint32] [--skip-bad]

Every *.parquet under ROOT (one folder per language) is read, in path order.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: import the data_prep package from the repository root, and do not let
    # this folder's modules shadow top-level names.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from data_prep import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Tokenize StarCoder parquet files into token shards.")
    args = p.parse_args(argv)
    return cli.main("starcoder", args)


if __name__ == "__main__":
    sys.exit(main())
