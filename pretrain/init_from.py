"""Continued pretraining: `pretrain/tinyllama.py --init-from CKPT` (litgpt's --initial_checkpoint_dir).

CKPT is any checkpoint the other commands read (pretrain/checkpoint.py `resolve_model_dir`):
ours (a finetune or consolidated directory), a pretraining checkpoint or output directory, or
an HF Llama/Mistral directory. The run takes from it

    the model Config   --config and --vocab-size may be given only when they agree with it
                       (they would name another shape); --block-size sets the length of the
                       training windows, and the model's context only when it is longer (a
                       model trained on shorter windows keeps the context it had)
    the weights        read straight into this run's FSDP2 shards (pretrain/sharded_load.py,
                       the load SFT and SPIN use), by every rank
    the tokenizer      CKPT's files, copied into every checkpoint; --tokenizer, when given,
                       must be the same tokenizer

and nothing else: the optimizer, the schedule and the step start afresh. A run that resumes
(--resume finds a checkpoint) reads its weights from that checkpoint instead.

`check_shards_tokenizer` (every run with a tokenizer, not only --init-from) refuses token
shards made with another tokenizer: data_prep's summary.json beside the shards records the
tokenizer's sha256 and document separator, and each shard header its vocab_size.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.run_state import SUMMARY_NAME
from data_prep.shards import list_shards, read_header
from data_prep.tokenizer import Tokenizer, load_tokenizer, tokenizer_file
from model import Config
from pretrain.checkpoint import resolve_model_dir


@dataclass
class InitFrom:
    path: Path                  # the directory the weights are read from (CKPT resolved)
    config: Config              # CKPT's (its context at least the window)
    window: int                 # tokens per training window: --block-size, else the model's context
    tokenizer: Path | None      # CKPT's tokenizer (the directory holding it), if it has one


def resolve(ckpt: str | os.PathLike, preset: str | None, vocab_size: int | None, block_size: int | None) -> InitFrom:
    """CKPT's model, checked against the shape flags given beside --init-from."""
    from pretrain.sharded_load import read_model_config

    if not Path(ckpt).exists():
        raise FileNotFoundError(f"--init-from {ckpt}: no such checkpoint directory")
    path = resolve_model_dir(ckpt)
    config = read_model_config(path)
    where = f"--init-from {ckpt}" + ("" if path == Path(ckpt) else f" ({path})")
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise ValueError(f"--vocab-size {vocab_size} contradicts {where}, whose vocab_size is {config.vocab_size}; "
                         f"leave --vocab-size out (the model's shape comes from the checkpoint)")
    if preset is not None:
        named = Config.from_name(preset, **({"vocab_size": vocab_size} if vocab_size else {}))
        named = dataclasses.replace(named, name=config.name, block_size=config.block_size)
        if named != config:
            differ = [f.name for f in dataclasses.fields(Config)
                      if getattr(named, f.name) != getattr(config, f.name)]
            raise ValueError(f"--config {preset} contradicts {where} in {', '.join(differ)}; leave --config out "
                             f"(the model's shape comes from the checkpoint)")
    window = block_size or config.block_size
    if window > config.block_size:  # RoPE's tables reach further; no weight depends on the context
        config = dataclasses.replace(config, block_size=window)
    return InitFrom(path, config, window, path if tokenizer_file(path) is not None else None)


def run_tokenizer(init: InitFrom | None, override: Path | None, vocab_size: int) -> tuple[Tokenizer, Path] | None:
    """The run's tokenizer and the path its files are copied from: --tokenizer, else CKPT's
    (None when neither gives one); it must fit the embedding, and be CKPT's when both are given."""
    source = override if override is not None else init.tokenizer if init is not None else None
    if source is None:
        return None
    tok = load_tokenizer(override=source, model_vocab_size=vocab_size)
    if override is not None and init is not None and init.tokenizer is not None:
        theirs = Tokenizer(init.tokenizer)
        if theirs.sha256 != tok.sha256:
            raise ValueError(f"--tokenizer {tok.path} is not the tokenizer of --init-from {init.path} "
                             f"({theirs.path}): the model's embedding rows belong to that one; leave --tokenizer out")
    return tok, Path(source)


def check_shards_tokenizer(tok: Tokenizer, directories: list[Path], what: str) -> list[Path]:
    """Refuse shard directories tokenized with another tokenizer than `tok` (`what` says where
    `tok` comes from); returns the directories with no summary.json, whose tokenizer only the
    shard headers' vocab_size could be checked against."""
    unchecked = []
    for directory in directories:
        if not Path(directory).is_dir():
            continue  # pretrain/data.py reports a missing directory
        for shard in list_shards(directory):
            vocab = read_header(shard).vocab_size
            if vocab != tok.vocab_size:
                raise ValueError(f"{shard}: the header's vocab_size is {vocab} (the tokenizer the shards were made "
                                 f"with) but {what} {tok.path} has {tok.vocab_size} ids; tokenize the corpus with "
                                 f"that tokenizer (data_prep --tokenizer {tok.path})")
        summary_path = Path(directory) / SUMMARY_NAME
        if not summary_path.is_file():
            unchecked.append(Path(directory))
            continue
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        made = summary.get("settings", {}).get("tokenizer_sha256")
        made_with = summary.get("tokenizer", {})
        # data_prep's --eos-token (a chat tokenizer's documents end with <|endoftext|>, not its
        # eos_token) is part of the hash: compare with the same tokenizer under that separator.
        separator = made_with.get("eos_token")
        expected = tok.sha256
        if separator and separator != tok.special_tokens.get("eos_token"):
            try:
                expected = Tokenizer(tok.source, eos_token=separator).sha256
            except ValueError:
                expected = None  # the separator is not even a token of ours
        if made != expected:
            raise ValueError(f"{summary_path}: the shards were tokenized with {made_with.get('path', '?')} (sha256 "
                             f"{str(made)[:12]}), not with {what} {tok.path} (sha256 {str(expected)[:12]}): their "
                             f"ids would name other tokens; tokenize the corpus with data_prep --tokenizer {tok.path}")
    return unchecked
