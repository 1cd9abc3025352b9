"""A checkpoint's chat template, and multi-turn chat prompts for talking to a model (scripts/chat.py).

A conversation is rendered with the checkpoint's own template, found in this order:

1. `chat_template.json` beside the weights: the template SFT and SPIN trained with
   (finetune/chat.py's `ChatEncoder.conversation_ids`, exact token ids);
2. an HF directory's Jinja chat template (`chat_template` in tokenizer_config.json, or a
   chat_template.jinja file): rendered to text the way transformers renders it, then
   tokenized the way transformers' apply_chat_template does (`Tokenizer.encode_chat`:
   special-token strings such as "<s>", "<|im_end|>" or "<|eot_id|>" become their ids).
   SFT and SPIN train with this template too (finetune/hf_chat.py) and save it beside their
   checkpoints as chat_template.jinja + tokenizer_config.json (`HFChatTemplate`), so their
   outputs are found here as well;
3. neither (a pretrained base model): the project's default template, and the caller is
   told so (`ChatFormat.is_default`).

Each format knows its end-of-turn token (the special token the template writes right after
an answer: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3, EOS for zephyr and ours) and
its `stop_ids` (that token and the tokenizer's EOS ids): generation stops on any of them.
A Jinja template whose generation prompt is not the start of the assistant's turn (one that
ignores add_generation_prompt) is refused: the model would be asked to go on with the
user's turn.

`Conversation` keeps the turns and, when the next prompt would not fit, drops the oldest
turns first.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.tokenizer import CONFIG_FILE as HF_TOKENIZER_CONFIG
from data_prep.tokenizer import Tokenizer, token_text
from finetune.chat import JINJA_FILE, TEMPLATE_FILE, ChatEncoder, ChatTemplate
from model.atomic import write_text

# Rendered once when a format is made: it finds the end-of-turn token and checks the
# generation prompt (and, for training, that the template splits at a token boundary).
PROBE = ("What is two plus two?", "Two plus two is four.")


class TemplateFormat:
    """Our template (finetune/chat.py), applied to token ids."""
    supports_system = False

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, source: str, is_default: bool = False):
        self.encoder = ChatEncoder(tokenizer, template)
        self.source, self.is_default = source, is_default
        self.end_of_turn, self.stop_ids = self.encoder.end_of_turn, self.encoder.stop_ids

    def ids(self, turns: list[tuple[str, str]], prompt: str, system: str | None = None) -> list[int]:
        if system is not None:
            raise ValueError(f"{self.source}: the project's chat template has no system turn")
        return self.encoder.conversation_ids(turns, prompt)


def messages_of(turns: list[tuple[str, str]], prompt: str | None, system: str | None = None) -> list[dict]:
    """HF-style messages: the system message (if any), the (user, assistant) turns, `prompt`."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + ([] if prompt is None else [{"role": "user", "content": prompt}])


class JinjaFormat:
    """An HF chat template: Jinja rendered to text, text to ids as transformers does."""
    is_default = False
    supports_system = True

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
        self.end_of_turn = self._check_probe()
        stops = [] if self.end_of_turn is None else [self.end_of_turn]
        self.stop_ids = tuple(dict.fromkeys((*stops, *tokenizer.stop_ids)))

    def render(self, turns: list[tuple[str, str]], prompt: str, system: str | None = None) -> str:
        return self.render_messages(messages_of(turns, prompt, system), add_generation_prompt=True)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for `messages`, as transformers' apply_chat_template(tokenize=False)."""
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as e:
            raise ValueError(f"{self.source}: the chat template failed to render ({e})") from e

    def _check_probe(self) -> int | None:
        """The end-of-turn token (None when the template writes no special token after an
        answer); refuses a template whose generation prompt is not the assistant turn's start."""
        prompt, answer = PROBE
        prompt_text = self.render_messages(messages_of([], prompt), True)
        row_text = self.render_messages(messages_of([(prompt, answer)], None), False)
        at = row_text.rfind(answer)
        if at < 0:
            raise ValueError(f"{self.source}: the chat template does not write the assistant's message: rendered, "
                             f"the answer {answer!r} is not in {row_text!r}")
        # Whitespace may separate the generation prompt from the answer (ours writes a space).
        if not row_text[:at].startswith(prompt_text) or row_text[len(prompt_text):at].strip():
            raise ValueError(f"{self.source}: the chat template has no generation prompt: with "
                             f"add_generation_prompt=True it renders {prompt_text[-60:]!r}, but the assistant's turn "
                             f"begins {row_text[max(at - 60, 0):at]!r}; generation would go on from the user's turn. "
                             f"Fix: write the start of the assistant's turn inside "
                             f"{{% if add_generation_prompt %}}...{{% endif %}} at the end of the template")
        special = self.tokenizer.special_ids | set(self.special_ids.values())
        after = self.encode(row_text[at + len(answer):])
        return next((i for i in after if i in special), None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_chat(text, self.special_ids)

    def chat_ids(self, text: str) -> list[int]:
        """A rendered conversation's ids, starting with the tokenizer's BOS (when it adds one to
        a text) even where the template writes none (zephyr, TinyLlama-Chat). Those models were
        trained on the rendered text tokenized with the tokenizer's BOS added (alignment-handbook,
        TRL and SPIN's code; HF's pipeline adds it too); apply_chat_template(tokenize=True) alone
        leaves it out. A template that writes BOS (Llama-3) keeps exactly one; a tokenizer that
        adds none (SmolLM2) gets none."""
        ids = self.encode(text)
        prefix = self.tokenizer.prefix_ids
        return ids if ids[:len(prefix)] == prefix else prefix + ids

    def ids(self, turns: list[tuple[str, str]], prompt: str, system: str | None = None) -> list[int]:
        return self.chat_ids(self.render(turns, prompt, system))


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
    """The template with the special tokens its directory names, each checked against `tokenizer`
    (from --tokenizer, it may not be the directory's own)."""
    pieces = dict(tokenizer.special_tokens)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = token_text(config.get(name))
        if text is not None:
            pieces[name] = text
    special_ids = {}
    for name, text in pieces.items():
        token_id = tokenizer.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{source}: {name} {text!r} is not a piece of tokenizer {tokenizer.path}; "
                             f"the tokenizer does not belong to this directory")
        special_ids[text] = token_id
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        text = token_text(entry)
        if text is None or text in special_ids:
            continue
        if not str(key).isdigit() or tokenizer.token_to_id(text) != int(key):
            raise ValueError(f"{source}: added token {text!r} (id {key}) is not in tokenizer {tokenizer.path}; "
                             f"tokens added on top of the tokenizer file are not supported")
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
        """chat_template.jinja, and its special tokens into tokenizer_config.json (merged into the
        one the tokenizer's files put there, if any)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / JINJA_FILE, self.text)
        config_path = directory / HF_TOKENIZER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        config.pop("chat_template", None)  # chat_template.jinja is the template
        write_text(config_path, json.dumps(config | self.tokens, indent=2, ensure_ascii=False) + "\n")


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
    system: str | None = None  # the system message, kept when old turns are dropped

    def prompt(self, message: str) -> tuple[list[int], int]:
        """(prompt ids for `message`, number of oldest turns dropped to make it fit).

        Dropped turns are gone for good: the next prompt would not fit them either.
        """
        for dropped in range(len(self.turns) + 1):
            ids = self.format.ids(self.turns[dropped:], message, self.system)
            if len(ids) <= self.max_prompt_len:
                del self.turns[:dropped]
                return ids, dropped
        raise ValueError(f"this message alone is {len(ids)} tokens with the template; the context leaves "
                         f"room for {self.max_prompt_len}: shorten it")

    def add(self, message: str, answer: str) -> None:
        self.turns.append((message, answer))

    def reset(self) -> None:
        self.turns.clear()
