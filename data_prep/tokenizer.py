"""Loads and checks the sentencepiece tokenizer given with --tokenizer.

The model file is read once in the parent: its bytes are hashed (so a resumed run can
tell that the tokenizer did not change) and handed to each worker, which builds its own
processor from them. Documents are encoded as their tokens followed by EOS, no BOS:
documents are concatenated into one stream and the EOS between them is the separator
(as TinyLlama's lit-gpt preparation did).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.errors import DataPrepError
from data_prep.shards import dtype_for_vocab

DTYPE_CHOICES = ("auto", "uint16", "uint32")


@dataclass(frozen=True)
class Tokenizer:
    path: str
    model_proto: bytes
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int
    dtype: np.dtype  # of the token ids in the shards

    def processor(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_proto=self.model_proto)

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "bos_id": self.bos_id}


def load_tokenizer(path: str | Path, dtype: str = "auto") -> Tokenizer:
    """Read and validate the model; `dtype` is "auto" (smallest that fits) or forced."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"tokenizer file {path} does not exist: pass a sentencepiece .model "
                            f"file with --tokenizer (train one with data_prep/train_tokenizer.py)")
    proto = path.read_bytes()
    try:
        processor = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on bad protos
        raise DataPrepError(f"{path} is not a sentencepiece model ({e})") from e
    vocab_size = processor.vocab_size()
    eos_id = processor.eos_id()
    if eos_id < 0:
        raise DataPrepError(f"{path} defines no EOS piece (eos_id={eos_id}); documents are separated "
                            f"by EOS, so train the tokenizer with eos_id set (e.g. eos_id=2)")
    if dtype not in DTYPE_CHOICES:
        raise DataPrepError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    token_dtype = dtype_for_vocab(vocab_size) if dtype == "auto" else np.dtype(dtype).newbyteorder("<")
    if vocab_size - 1 > np.iinfo(token_dtype).max:
        raise DataPrepError(f"{path} has {vocab_size} pieces: ids up to {vocab_size - 1} do not fit "
                            f"--dtype {dtype} (max {np.iinfo(token_dtype).max}); use --dtype uint32 or auto")
    return Tokenizer(path=str(path.resolve()), model_proto=proto, sha256=hashlib.sha256(proto).hexdigest(),
                     vocab_size=vocab_size, eos_id=eos_id, bos_id=processor.bos_id(), dtype=token_dtype)
