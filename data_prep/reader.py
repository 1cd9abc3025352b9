"""Reads a finished output directory back as documents.

`iter_documents(OUT)` walks the shards in name order (the order they were written, which
is input files sorted by path, then line/row order) and splits the token stream at EOS.
Documents may span shard boundaries; each is yielded once, as a NumPy array of its token
ids without the EOS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.shards import ShardFormatError, list_shards, read_header, read_shard

# Same names as run_state.py; repeated here so that reading needs no writer-side imports.
_WORK_DIR_NAME = ".work"
_SUMMARY_NAME = "summary.json"


def iter_documents(directory: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield each document's token ids (EOS removed), in the deterministic output order."""
    directory = Path(directory)
    if (directory / _WORK_DIR_NAME).exists() and not (directory / _SUMMARY_NAME).exists():
        raise ShardFormatError(f"{directory} holds an unfinished run ({_WORK_DIR_NAME}/ is present); "
                               f"run the same tokenize command again to finish it")
    paths = list_shards(directory)
    if not paths:
        raise ShardFormatError(f"{directory} holds no *.bin shards")
    first = read_header(paths[0])
    carry: list[np.ndarray] = []  # the start of a document that continues in the next shard
    for path in paths:
        header = read_header(path)
        if (header.eos_id, header.vocab_size, header.dtype) != (first.eos_id, first.vocab_size, first.dtype):
            raise ShardFormatError(f"{path}: header (eos {header.eos_id}, vocab {header.vocab_size}, "
                                   f"{header.dtype}) differs from {paths[0].name}'s; shards of different "
                                   f"tokenizers are mixed in {directory}")
        tokens = read_shard(path)
        start = 0
        for end in np.flatnonzero(tokens == header.eos_id):
            piece = np.array(tokens[start:end])  # copy: never hand out views of the memory map
            if carry:
                piece = np.concatenate(carry + [piece])
                carry = []
            yield piece
            start = end + 1
        if start < len(tokens):
            carry.append(np.array(tokens[start:]))
    if carry:
        raise ShardFormatError(f"{paths[-1]}: the token stream ends without EOS: the last document "
                               f"is incomplete")
