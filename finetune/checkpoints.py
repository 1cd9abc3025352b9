"""Loading a starting checkpoint (weights + tokenizer + chat template) and saving a finetuned one.

A finetuned checkpoint directory is self-contained: config.json + model.safetensors (our
consolidated format), tokenizer.model, and the chat template it was trained with: ours
(chat_template.json + chat_template.jinja) or the HF template --ckpt brought
(chat_template.jinja + tokenizer_config.json, finetune/conversation.py `HFChatTemplate`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from finetune.chat import ChatTemplate
from finetune.conversation import HFChatTemplate, load_chat_template
from pretrain.checkpoint import load_model_from_any, save_consolidated
from finetune.tokenizer import Tokenizer, load_tokenizer
from pretrain.checkpoint import resolve_model_dir


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
        template.save(tmp)
        extra = {path.name: path for path in Path(tmp).iterdir()}
        save_consolidated(fabric, model, directory, tokenizer=tok.path, extra_files=extra)
    return directory
