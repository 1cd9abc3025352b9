"""Find and load the sentencepiece tokenizer every finetune command uses.

Resolution order: `--tokenizer FILE` (overrides) -> `CKPT/tokenizer.model` (every checkpoint
we save keeps one beside the weights). A tokenizer with more pieces than the model's
embedding has rows is an error: those ids would index past the embedding table.
"""
from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """A thin wrapper over SentencePieceProcessor with the few calls finetune needs.

    The file is read and checked by data_prep's `load_tokenizer`, the repository's one
    tokenizer loader, so a model file is judged the same way when shards are made and when
    a model is fine-tuned.
    """

    def __init__(self, path: str | os.PathLike):
        from data_prep.errors import DataPrepError
        from data_prep.tokenizer import load_tokenizer as read_tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path} not found (pass a sentencepiece .model file)")
        try:
            loaded = read_tokenizer(self.path)
        except DataPrepError as e:
            raise ValueError(str(e)) from e
        self.sp = loaded.processor()
        self.bos_id, self.eos_id = loaded.bos_id, loaded.eos_id
        if self.bos_id < 0:
            raise ValueError(f"{self.path}: the tokenizer needs BOS and EOS pieces "
                             f"(bos_id={self.bos_id}, eos_id={self.eos_id})")
        # Right padding uses the EOS id: padded positions are always masked out of every loss.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i != self.eos_id])


def resolve_tokenizer_path(ckpt: str | os.PathLike | None, override: str | os.PathLike | None) -> Path:
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {path} not found")
        return path
    if ckpt is not None and (Path(ckpt) / TOKENIZER_FILE).is_file():
        return Path(ckpt) / TOKENIZER_FILE
    raise FileNotFoundError(f"no tokenizer: {Path(ckpt) / TOKENIZER_FILE if ckpt else 'the checkpoint'} "
                            f"does not exist; pass --tokenizer FILE (a sentencepiece .model)")


def load_tokenizer(ckpt=None, override=None, model_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer for `ckpt` (or `override`), checked against the model's vocabulary."""
    tok = Tokenizer(resolve_tokenizer_path(ckpt, override))
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{model_vocab_size}: ids >= {model_vocab_size} cannot be embedded; use the "
                         f"tokenizer the model was trained with")
    return tok
