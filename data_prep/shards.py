"""Token shard files: the one on-disk format between data_prep/ and pretrain/.

A shard is a fixed 64-byte little-endian header followed by the token ids as a flat
uint16 or uint32 array (docs/data_format.md has the byte layout). Shards are written
under a temporary name and renamed when complete, so a reader never sees half a shard;
they are read memory-mapped, without copying.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.atomic import atomic_path

MAGIC = b"TLSHARD\x00"
VERSION = 1
HEADER_SIZE = 64
SHARD_SUFFIX = ".bin"
# magic, version, dtype code (= itemsize), vocab size, eos id, tokens, documents
_HEADER = struct.Struct("<8sIIIiQQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardFormatError(ValueError):
    """A file that is not a complete, valid token shard."""


@dataclass(frozen=True)
class ShardHeader:
    dtype: np.dtype
    vocab_size: int
    eos_id: int
    num_tokens: int
    num_docs: int  # documents whose EOS lies in this shard

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, self.eos_id,
                           self.num_tokens, self.num_docs)
        return raw.ljust(HEADER_SIZE, b"\x00")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return _DTYPES[2]
    if vocab_size <= 2**32:
        return _DTYPES[4]
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, *, vocab_size: int, eos_id: int,
                num_docs: int, dtype: np.dtype | None = None) -> ShardHeader:
    """Write `tokens` as a shard at `path` atomically (temporary name, fsync, rename)."""
    path = Path(path)
    dtype = np.dtype(dtype) if dtype is not None else dtype_for_vocab(vocab_size)
    if dtype.itemsize not in _DTYPES:
        raise ValueError(f"shard dtype must be uint16 or uint32, got {dtype}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), "
                         f"got [{int(tokens.min())}, {int(tokens.max())}]")
    header = ShardHeader(_DTYPES[dtype.itemsize], vocab_size, eos_id, int(tokens.size), num_docs)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.pack())
        f.write(tokens.astype(header.dtype, copy=False).tobytes())
    return header


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardFormatError(f"{path}: {len(raw)} bytes is shorter than the {HEADER_SIZE}-byte shard header")
    magic, version, code, vocab, eos, ntok, ndocs = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ShardFormatError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ShardFormatError(f"{path}: shard format version {version}; this code reads version {VERSION}")
    if code not in _DTYPES:
        raise ShardFormatError(f"{path}: unknown token dtype code {code} in the header")
    header = ShardHeader(_DTYPES[code], vocab, eos, ntok, ndocs)
    expected = HEADER_SIZE + ntok * header.dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ShardFormatError(f"{path}: file is {actual} bytes but its header promises {expected} "
                               f"({ntok} tokens); the shard is truncated or corrupt")
    return header


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only 1-D memory map (uint16 or uint32)."""
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.num_tokens,))


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Complete shards in `directory`, sorted by name (temporary files are never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"shard directory {directory} does not exist")
    return sorted(p for p in directory.glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))
