"""Loading a starting checkpoint (weights + tokenizer + chat template) and saving a finetuned one.

A finetuned checkpoint directory is self-contained: config.json + model.safetensors (our
consolidated format), the tokenizer's files as they came (tokenizer.model or tokenizer.json,
with tokenizer_config.json, special_tokens_map.json and generation_config.json when it has
them; data_prep/tokenizer.py), and the chat template it was trained with: ours
(chat_template.json + chat_template.jinja) or the HF template --ckpt brought
(chat_template.jinja + its special tokens in tokenizer_config.json, finetune/conversation.py
`HFChatTemplate`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from data_prep.tokenizer import CONFIG_FILE, Tokenizer, load_tokenizer
from finetune.chat import ChatTemplate
from finetune.conversation import HFChatTemplate, load_chat_template
from model.atomic import write_text
from pretrain.checkpoint import load_model_from_any, resolve_model_dir, save_consolidated


def load_start(ckpt, tokenizer=None, kernels: str = "auto", fabric=None, weights: bool = True):
    """(model, Tokenizer, chat template) for --ckpt (our format, training ckpt or HF dir, or a
    pretraining output dir: the tokenizer and template are read beside the weights it resolves to).

    The model is a whole one on CPU; with `fabric`, sharded on it, each rank reading only its
    shards (collective; pretrain/sharded_load.py); with `weights=False`, on the meta device
    (its config only, nothing read). The template is the checkpoint's own (ours, or its HF
    Jinja template), else our default."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    ckpt = resolve_model_dir(ckpt)
    model = _load_weights(ckpt, kernels, fabric, weights)
    tok = load_tokenizer(ckpt, tokenizer, model_vocab_size=model.config.vocab_size)
    return model, tok, load_chat_template(ckpt) or ChatTemplate()


def _load_weights(ckpt: Path, kernels: str, fabric, weights: bool):
    from model import Llama
    from pretrain.sharded_load import load_sharded, read_model_config

    if not weights:
        with torch.device("meta"):
            return Llama(read_model_config(ckpt), kernels=kernels)
    return load_model_from_any(ckpt, kernels=kernels) if fabric is None else load_sharded(fabric, ckpt, kernels)


def save_finetuned(fabric, model, directory, tok: Tokenizer, template: ChatTemplate | HFChatTemplate) -> Path:
    """Consolidated weights + tokenizer + template, written as one directory (collective: every rank calls it)."""
    import tempfile

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer_and_template(tok, template, tmp)
        extra = {path.name: path for path in Path(tmp).iterdir()}
        save_consolidated(fabric, model, directory, extra_files=extra)
    return directory


def save_tokenizer_and_template(tok: Tokenizer, template: ChatTemplate | HFChatTemplate, directory) -> None:
    """The tokenizer's files, then the template: its files, and (an HF one) its special tokens
    merged into tokenizer_config.json. A chat_template the tokenizer's own tokenizer_config.json
    held is dropped from it: the template trained with is the one saved."""
    import json

    directory = Path(directory)
    tok.save(directory)
    config = directory / CONFIG_FILE
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            write_text(config, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if isinstance(template, ChatTemplate):
        template.save(directory, prefix_space=tok.adds_prefix_space)
    else:
        template.save(directory)
