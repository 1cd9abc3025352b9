"""A checkpoint's chat template, and multi-turn chat prompts for talking to a model (scripts/chat.py).

A conversation is rendered with the checkpoint's own template, found in this order:

1. `chat_template.json` beside the weights: the template SFT and SPIN trained with
   (finetune/chat.py's `ChatEncoder.conversation_ids`, exact token ids);
2. an HF directory's Jinja chat template (`chat_template` in tokenizer_config.json, or a
   chat_template.jinja file): rendered to text the way transformers renders it, then
   tokenized the way transformers' Llama tokenizer does (special-token strings such as
   "<s>" and "</s>" become their ids; only text at the very start gets sentencepiece's
   leading space). SFT and SPIN train with this template too (finetune/hf_chat.py) and
   save it beside their checkpoints as chat_template.jinja + tokenizer_config.json
   (`HFChatTemplate`), so their outputs are found here as well;
3. neither (a pretrained base model): the project's default template, and the caller is
   told so (`ChatFormat.is_default`).

`Conversation` keeps the turns and, when the next prompt would not fit, drops the oldest
turns first.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.chat import JINJA_FILE, TEMPLATE_FILE, ChatEncoder, ChatTemplate
from finetune.tokenizer import Tokenizer
from model.atomic import write_text

HF_TOKENIZER_CONFIG = "tokenizer_config.json"


class TemplateFormat:
    """Our template (finetune/chat.py), applied to token ids."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, source: str, is_default: bool = False):
        self.encoder = ChatEncoder(tokenizer, template)
        self.source, self.is_default = source, is_default

    def ids(self, turns: list[tuple[str, str]], prompt: str) -> list[int]:
        return self.encoder.conversation_ids(turns, prompt)


class JinjaFormat:
    """An HF chat template: Jinja rendered to text, text to ids as transformers' Llama tokenizer does."""
    is_default = False

    def __init__(self, tokenizer: Tokenizer, template: str, special_tokens: dict[str, str],
                 special_ids: dict[str, int], source: str):
        from jinja2.exceptions import TemplateError

        self.tokenizer, self.source = tokenizer, source
        self.special_tokens = special_tokens      # bos_token etc. as the template sees them
        self.special_ids = special_ids            # every special string -> its id
        try:
            self.template = _jinja_env().from_string(template)
        except TemplateError as e:
            raise ValueError(f"{source}: the chat template is not valid Jinja ({e})") from e
        self._specials = re.compile("|".join(re.escape(s) for s in sorted(special_ids, key=len, reverse=True)))
        self._no_prefix = _without_dummy_prefix(tokenizer)

    def render(self, turns: list[tuple[str, str]], prompt: str) -> str:
        messages = []
        for user, answer in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": prompt})
        return self.render_messages(messages, add_generation_prompt=True)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for `messages`, as transformers' apply_chat_template(tokenize=False)."""
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as e:
            raise ValueError(f"{self.source}: the chat template failed to render ({e})") from e

    def encode(self, text: str) -> list[int]:
        ids, pos = [], 0
        for match in self._specials.finditer(text):
            ids += self._encode_text(text[pos:match.start()], at_start=pos == 0)
            ids.append(self.special_ids[match.group()])
            pos = match.end()
        return ids + self._encode_text(text[pos:], at_start=pos == 0)

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        # Only the text at offset 0 gets the leading "▁"; text after a special token does not.
        return self.tokenizer.encode(text) if at_start else self._no_prefix.encode(text)

    def chat_ids(self, text: str) -> list[int]:
        """A rendered conversation's ids, starting with BOS even where the template writes none
        (zephyr, TinyLlama-Chat). Those models were trained on the rendered text tokenized with
        the tokenizer's BOS added (alignment-handbook, TRL and SPIN's code; HF's pipeline adds it
        too); apply_chat_template(tokenize=True) alone leaves it out. A template that writes BOS
        keeps exactly one."""
        ids = self.encode(text)
        bos = self.tokenizer.bos_id
        return ids if ids[:1] == [bos] else [bos] + ids

    def ids(self, turns: list[tuple[str, str]], prompt: str) -> list[int]:
        return self.chat_ids(self.render(turns, prompt))


def _jinja_env():
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    # The settings chat templates are written for (transformers renders them this way).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _without_dummy_prefix(tokenizer: Tokenizer):
    """The same sentencepiece model, but without the leading space it adds to every text."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _hf_chat_template(directory: Path) -> tuple[str, str, dict] | None:
    """(template, where it was found, tokenizer_config) of an HF directory, or None."""
    config_path = directory / HF_TOKENIZER_CONFIG
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template.strip():
        return template, f"{config_path} (chat_template)", config
    jinja = directory / JINJA_FILE
    if jinja.is_file() and (directory / HF_TOKENIZER_CONFIG).is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja), config
    return None


def _jinja_format(tokenizer: Tokenizer, template: str, source: str, config: dict) -> JinjaFormat:
    sp = tokenizer.sp
    pieces = {"bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eos_id)}
    if sp.unk_id() >= 0:
        pieces["unk_token"] = sp.id_to_piece(sp.unk_id())
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(config.get(name))
        if text is not None:
            pieces[name] = text
    special_ids = {}
    for name, text in pieces.items():
        token_id = sp.piece_to_id(text)
        if token_id == sp.unk_id() and text != sp.id_to_piece(sp.unk_id()):
            raise ValueError(f"{source}: {name} {text!r} is not a piece of tokenizer {tokenizer.path}; "
                             f"the tokenizer does not belong to this directory")
        special_ids[text] = token_id
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is None or text in special_ids:
            continue
        if int(key) >= tokenizer.vocab_size or sp.piece_to_id(text) != int(key):
            raise ValueError(f"{source}: added token {text!r} (id {key}) is not in tokenizer {tokenizer.path}; "
                             f"tokens added on top of tokenizer.model are not supported")
        special_ids[text] = int(key)
    return JinjaFormat(tokenizer, template, pieces, special_ids, source)


@dataclass(frozen=True)
class HFChatTemplate:
    """An HF directory's Jinja chat template with the special tokens its tokenizer_config.json
    names: what SFT and SPIN train with when --ckpt brings one (finetune/hf_chat.py), and what
    they save beside their checkpoints, in transformers' layout (chat_template.jinja beside a
    tokenizer_config.json), so the chat, SPIN's later iterations and the HF export read it back."""
    text: str
    source: str                 # the file it was read from, for messages
    tokens: dict = field(default_factory=dict)  # bos/eos/unk/pad_token, added_tokens_decoder

    def format(self, tokenizer: Tokenizer) -> "JinjaFormat":
        return _jinja_format(tokenizer, self.text, self.source, self.tokens)

    def describe(self) -> str:
        return f"the HF checkpoint's own, from {self.source}"

    def fingerprint(self) -> str:
        """Changes when the template or its special tokens change (SPIN's run_args.json)."""
        data = json.dumps({"template": self.text, "tokens": self.tokens}, sort_keys=True)
        return "hf sha256:" + hashlib.sha256(data.encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / JINJA_FILE, self.text)
        write_text(directory / HF_TOKENIZER_CONFIG, json.dumps(self.tokens, indent=2, ensure_ascii=False) + "\n")


def load_chat_template(directory: str | Path) -> ChatTemplate | HFChatTemplate | None:
    """The checkpoint's own template (see the module docstring for the order), None if it has none."""
    directory = Path(directory)
    if (directory / TEMPLATE_FILE).is_file():
        return ChatTemplate.load(directory)
    found = _hf_chat_template(directory)
    if found is None:
        return None
    text, source, config = found
    keep = ("bos_token", "eos_token", "unk_token", "pad_token", "added_tokens_decoder")
    return HFChatTemplate(text, source, {k: config[k] for k in keep if config.get(k) is not None})


def find_chat_format(directory: str | Path, tokenizer: Tokenizer) -> TemplateFormat | JinjaFormat:
    """The checkpoint's own chat template (see the module docstring for the order)."""
    directory = Path(directory)
    template = load_chat_template(directory)
    if template is None:
        return TemplateFormat(tokenizer, ChatTemplate(), "the project's default template", is_default=True)
    if isinstance(template, ChatTemplate):
        return TemplateFormat(tokenizer, template, str(directory / TEMPLATE_FILE))
    return template.format(tokenizer)


@dataclass
class Conversation:
    """The turns so far, rendered as the prompt for the next answer within `max_prompt_len` tokens."""
    format: TemplateFormat | JinjaFormat
    max_prompt_len: int
    turns: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, message: str) -> tuple[list[int], int]:
        """(prompt ids for `message`, number of oldest turns dropped to make it fit).

        Dropped turns are gone for good: the next prompt would not fit them either.
        """
        for dropped in range(len(self.turns) + 1):
            ids = self.format.ids(self.turns[dropped:], message)
            if len(ids) <= self.max_prompt_len:
                del self.turns[:dropped]
                return ids, dropped
        raise ValueError(f"this message alone is {len(ids)} tokens with the template; the context leaves "
                         f"room for {self.max_prompt_len}: shorten it")

    def add(self, message: str, answer: str) -> None:
        self.turns.append((message, answer))

    def reset(self) -> None:
        self.turns.clear()
