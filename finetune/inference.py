"""Talking to a trained model: load any checkpoint for inference and stream one answer.

Used by scripts/generate.py and scripts/chat.py. Loading goes through finetune/checkpoints.py
(`load_start`: our consolidated format, a pretraining checkpoint or output directory, an HF
Llama directory, each with the tokenizer found beside its weights); decoding is
finetune/generate.py's KV-cache `generate_batch` with one prompt, whose per-token hook feeds
`TextStream`, so text appears as it is produced: the one incremental decoder for both tokenizer
backends (byte-level BPE and sentencepiece byte fallback, whose characters can span tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.tokenizer import Tokenizer
from finetune.checkpoints import load_start
from finetune.generate import generate_batch
from pretrain.checkpoint import resolve_model_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_and_sampling_args(parser, max_new_tokens: int, max_new_tokens_help: str) -> None:
    """The command-line options generate.py and chat.py share (checkpoint, device, sampling)."""
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory: our consolidated "
                        "format, a pretraining checkpoint or output directory, or an HF Llama directory")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the most likely "
                        "tokens whose probability adds up to this")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed gives the same text)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer to use instead of the checkpoint's: a "
                        "sentencepiece .model, an HF tokenizer.json, or a directory holding one")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on a GPU, else fp32")


def check_sampling_args(parser, args) -> None:
    """Reject impossible values the way argparse does (usage line, exit code 2)."""
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")


def pick_device(name: str = "auto") -> torch.device:
    """"auto" is the GPU when there is one, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device name ({e}); use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available; use --device cpu (or auto)")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    directory: Path  # the directory the weights came from; the chat template is looked up there
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.directory} ({self.model.config.name}, {self.model.num_params():,} parameters, "
                f"context {self.model.config.block_size}, {self.device.type} {dtype})")


def _check_hf_special_ids(directory: Path, tok: Tokenizer) -> None:
    """An HF config whose BOS/EOS ids are not the tokenizer's means the two do not belong together."""
    config = directory / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return  # not an HF directory; our formats carry no token ids in their config
    for field, ours in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
        value = data.get(field)
        # eos_token_id may be a list (Llama-3 instruct: end of text, end of turn, ...): ours must be one.
        listed = value if isinstance(value, list) else [value] if isinstance(value, int) else None
        if listed is not None and ours is not None and ours not in listed:
            raise ValueError(f"{config}: {field} is {value} but tokenizer {tok.path} has {ours}; "
                             f"pass the tokenizer this model was trained with (--tokenizer FILE)")


def load_for_inference(ckpt, tokenizer=None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Model (eval mode, on `device` in `dtype`) and tokenizer for any checkpoint the project reads."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model, tok, _ = load_start(ckpt, tokenizer, kernels="auto")
    directory = resolve_model_dir(ckpt)
    _check_hf_special_ids(directory, tok)
    return LoadedModel(model.to(device=dev, dtype=dt).eval(), tok, directory, dev, dt)


class TextStream:
    """Text for ids that arrive one at a time, as the pieces to print.

    A token's text depends on its neighbours: sentencepiece drops a word's leading space at the
    start of a text, and a character split into byte tokens (byte-level BPE, sentencepiece's
    byte fallback: é, 日本語, emoji) is only whole once its last byte arrives. So each step
    decodes a short window, the ids from the previous piece's start on, and hands out what
    the new ids added to it; while the text ends in an incomplete character ("\ufffd") it is
    held back. Each step costs O(window), not O(everything so far). `context` are ids whose
    text precedes the answer on screen (for generate.py, the end of the prompt).
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.context = list(context)
        self.ids: list[int] = []
        self._all = list(context)
        self._start = 0                 # the window decoded each step starts here
        self._shown = len(self._all)    # the text of _all[:_shown] has been handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._all.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self._all[self._start:self._shown])
        text = decode(self._all[self._start:])
        if len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self._start, self._shown = self._shown, len(self._all)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self._all[self._start:self._shown])
        text = self.tokenizer.decode(self._all[self._start:])
        self._start = self._shown = len(self._all)
        return text[len(before):] if text.startswith(before) else ""

    @property
    def text(self) -> str:
        """The answer's text: what the pieces add up to."""
        base = self.tokenizer.decode(self.context)
        full = self.tokenizer.decode(self._all)
        return full[len(base):] if full.startswith(base) else self.tokenizer.decode(self.ids)


@dataclass
class Answer:
    ids: list[int]      # generated ids, the stop token not included
    text: str
    stop: str           # "eos" (a stop token), "length" (max_new_tokens reached) or "interrupted" (Ctrl-C)


def stream_answer(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int, on_text, *,
                  temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                  context: list[int] = (), stop_ids=None) -> Answer:
    """Generate after `prompt_ids`, calling `on_text(piece)` as text appears, until one of
    `stop_ids` (default: the tokenizer's EOS ids; a chat adds its template's end-of-turn token).

    Ctrl-C (KeyboardInterrupt) while decoding ends the answer early: what was produced so far is
    returned with stop="interrupted", so a chat can go on. `context` are ids whose text precedes
    the answer on screen (for generate.py, the end of the prompt), so spacing comes out right.
    """
    tok = loaded.tokenizer
    stops = tuple(tok.stop_ids if stop_ids is None else stop_ids)
    stream = TextStream(tok, context)
    stop = "length"

    def on_token(tokens: torch.Tensor) -> None:
        nonlocal stop
        token = int(tokens[0])
        if stop == "eos":  # after a stop token the row only feeds padding
            return
        if token in stops:
            stop = "eos"
            return
        piece = stream.push(token)
        if piece:
            on_text(piece)

    try:
        generate_batch(loaded.model, [prompt_ids], max_new_tokens, stops, tok.pad_id,
                       temperature=temperature, top_p=top_p, generator=generator, on_token=on_token)
    except KeyboardInterrupt:
        stop = "interrupted"
    rest = stream.flush()
    if rest:
        on_text(rest)
    return Answer(ids=stream.ids, text=stream.text, stop=stop)


def new_token_budget(loaded: LoadedModel, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens, or fewer when the prompt leaves less room in the model's context."""
    block = loaded.model.config.block_size
    if prompt_len >= block:
        raise ValueError(f"the prompt is {prompt_len} tokens; the model's context is {block}, which leaves "
                         f"no room to generate: shorten it")
    return min(max_new_tokens, block - prompt_len)


def make_generator(loaded: LoadedModel, seed: int) -> torch.Generator:
    return torch.Generator(device=loaded.device).manual_seed(seed)
