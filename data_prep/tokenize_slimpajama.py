"""Tokenize a SlimPajama split into token shards.

    python data_prep/tokenize_slimpajama.py --input ROOT --output OUT/slimpajama_train \
        --tokenizer tokenizer.model [--split train|validation|test] [--workers N] \
        [--shard-tokens N] [--dtype auto|uint16|uint32] [--skip-bad]

ROOT holds train/ validation/ test/ with chunk*/*.jsonl.zst; RedPajamaGithub documents
are left out (StarCoder covers code). Give each split its own --output directory.
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
from data_prep.slimpajama import SPLITS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Tokenize a SlimPajama split (*.jsonl.zst) into token shards.")
    p.add_argument("--split", choices=SPLITS, default="train", help="which split under --input")
    args = p.parse_args(argv)
    return cli.main("slimpajama", args, split=args.split)


if __name__ == "__main__":
    sys.exit(main())
