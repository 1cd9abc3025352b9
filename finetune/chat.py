"""Chat data and the one chat template used by SFT, generation and SPIN.

Data: UltraChat-200k as users have it on disk, `.jsonl` or `.parquet`, rows
`{"prompt": ..., "prompt_id": ..., "messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}`.
By default the first user turn and the assistant answer that follows it are used.

Template: small sentencepiece tokenizers have no chat special tokens, and text such as
"</s>" is not parsed back into EOS, so the template is applied to token ids, not text
(BOS where the tokenizer has one; EOS is the answer's end-of-turn token):

    prompt_ids   = [BOS] + enc(user_header) + enc(prompt) + enc(assistant_header)
    response_ids = enc(response) + [EOS]
    training row = prompt_ids + response_ids, labels = -100 on prompt_ids and padding

Each piece is encoded on its own, so the prompt/response boundary is exact by construction
and generation starts from exactly the same `prompt_ids` that SFT and SPIN trained after.
The template (header strings) is saved beside every checkpoint as chat_template.json, with
an equivalent Jinja string in chat_template.jinja for the HF export (scripts/convert_hf.py).
HF's tokenizer applied to the rendered Jinja text gives nearly, not always exactly, the
same ids (it encodes the whole string at once); our ids come from this module. The template
has no system turn: a system message is not part of it.

A checkpoint that brings its own Hugging Face chat template (TinyLlama-Chat, zephyr) is
trained and prompted with that one instead: finetune/hf_chat.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.atomic import write_text
from data_prep.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.json"
JINJA_FILE = "chat_template.jinja"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatTemplate:
    user_header: str = "<|user|>\n"
    assistant_header: str = "\n<|assistant|>\n"

    def jinja(self, prefix_space: bool = True) -> str:
        """The same layout as a transformers chat template, giving the same token ids.

        We encode header, prompt, header and response as separate calls. With sentencepiece
        (`prefix_space`: the tokenizer's dummy prefix) each call starts with a space; HF
        tokenizes the rendered string in one go and adds no space after BOS. A space before
        each segment in the rendered text reproduces our ids exactly (tests/test_finetune_chat.py
        checks it). A byte-level BPE tokenizer adds no space, so none is written for it.
        """
        u, a = json.dumps(self.user_header), json.dumps(self.assistant_header)
        sp = "' ' + " if prefix_space else ""
        return ("{{ bos_token }}{% for message in messages %}"
                "{% if message['role'] == 'user' %}{{ " + sp + u + " + " + sp + "message['content'] + " + sp + a + " }}"
                "{% elif message['role'] == 'assistant' %}{{ " + sp + "message['content'] + eos_token }}{% endif %}"
                "{% endfor %}")

    def describe(self) -> str:
        return f"ours (finetune/chat.py: {self.user_header!r} prompt {self.assistant_header!r} answer EOS)"

    def fingerprint(self) -> str:
        """Changes when the template changes (SPIN's run_args.json)."""
        return "ours " + json.dumps(asdict(self), sort_keys=True)

    def save(self, directory: str | os.PathLike, prefix_space: bool = True) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / TEMPLATE_FILE, json.dumps(asdict(self), indent=2) + "\n")
        write_text(directory / JINJA_FILE, self.jinja(prefix_space))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ChatTemplate":
        """The checkpoint's template, or the default one for a checkpoint that has none (pretrained)."""
        path = Path(directory) / TEMPLATE_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: expected {{\"user_header\": ..., \"assistant_header\": ...}} ({e})") from e




# ---- reading chat data -------------------------------------------------------------------
@dataclass
class ChatExample:
    index: int          # row number in the data file: the key used for resume and de-duplication
    prompt_id: str
    prompt: str
    response: str


def read_rows(path: Path, columns: tuple[str, ...] = ("messages",)):
    """Yield (row number, dict) from a .jsonl or .parquet file (a parquet file must have `columns`)."""
    if not path.is_file():
        raise FileNotFoundError(f"chat data {path} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = set(columns) - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {table.column_names}")
        for i, row in enumerate(table.to_pylist()):
            yield i + 1, row
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from e
    else:
        raise ValueError(f"{path}: unsupported chat data format {path.suffix!r}; use .jsonl or .parquet "
                         f"with rows {{prompt, prompt_id, messages: [{{role, content}}, ...]}}")


def read_chat(path: str | os.PathLike, limit: int | None = None) -> list[ChatExample]:
    """The first user turn and its assistant answer of each row (up to `limit` rows)."""
    path = Path(path)
    examples: list[ChatExample] = []
    for line, row in read_rows(path):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}:{line}" if path.suffix != ".parquet" else f"{path} row {line}"
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
        if user is None:
            raise ValueError(f"{where}: 'messages' has no turn with role 'user'")
        if user + 1 >= len(messages) or not isinstance(messages[user + 1], dict) \
                or messages[user + 1].get("role") != "assistant":
            raise ValueError(f"{where}: the first user turn (messages[{user}]) must be followed by an "
                             f"'assistant' turn")
        prompt, response = messages[user].get("content"), messages[user + 1].get("content")
        for name, value in ((f"messages[{user}].content", prompt), (f"messages[{user + 1}].content", response)):
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {name} must be a string, got {type(value).__name__}")
        prompt_id = row.get("prompt_id")
        examples.append(ChatExample(index=len(examples), prompt_id=str(prompt_id if prompt_id is not None else line),
                                    prompt=prompt, response=response))
    if not examples:
        raise ValueError(f"{path}: no chat rows found")
    return examples


# ---- tokenisation ------------------------------------------------------------------------
@dataclass
class TruncationStats:
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChatEncoder:
    """Turns prompts/answers into ids with one template; counts truncations.

    A prompt's ids are (template head, the prompt's own tokens, template tail): truncation cuts
    only the middle part. finetune/hf_chat.py's `JinjaChatEncoder` is the same with an HF
    checkpoint's Jinja template; `chat_encoder` picks the one a checkpoint's template needs.
    """
    tokenizer: Tokenizer
    template: ChatTemplate = field(default_factory=ChatTemplate)
    stats: TruncationStats = field(default_factory=TruncationStats)
    system: str | None = None  # a system message before every prompt: HF templates only

    def __post_init__(self):
        if self.system is not None:
            raise ValueError(f"the chat template {self.template.describe()} has no system turn; a system "
                             f"message needs a checkpoint whose HF chat template has one")
        self._bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        self._head = self._bos + self.tokenizer.encode(self.template.user_header)
        self._tail = self.tokenizer.encode(self.template.assistant_header)

    @property
    def end_of_turn(self) -> int:
        """The token that closes an answer: the last trained token, where generation stops."""
        return self.tokenizer.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops on any of these: the end-of-turn token and the tokenizer's stop ids."""
        return tuple(dict.fromkeys((self.end_of_turn, *self.tokenizer.stop_ids)))

    def prompt_parts(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        """(template head, the prompt's tokens, template tail) of the untruncated prompt."""
        return self._head, self.tokenizer.encode(prompt), self._tail

    def _cut_prompt(self, parts: tuple[list[int], list[int], list[int]], room: int) -> list[int]:
        # A long prompt keeps its end: in chat data the question is usually last.
        head, body, tail = parts
        if len(body) > room:
            self.stats.prompts_truncated += 1
            body = body[len(body) - room:]
        return head + body + tail

    def prompt_ids(self, prompt: str, max_len: int) -> list[int]:
        """The ids generation starts from (at most max_len of them)."""
        parts = self.prompt_parts(prompt)
        fixed = len(parts[0]) + len(parts[2])
        if max_len - fixed < 1:
            raise ValueError(f"max length {max_len} leaves no room for a prompt after the template's "
                             f"{fixed} header tokens")
        return self._cut_prompt(parts, max_len - fixed)

    def conversation_ids(self, turns: list[tuple[str, str]], prompt: str) -> list[int]:
        """The ids of a multi-turn chat, ready for the next answer: BOS once, then each earlier
        (user, assistant) turn laid out as in training (the answer closed by EOS), then `prompt`
        between the headers. With no earlier turns this is `prompt_ids` (uncut); the layout is
        the one chat_template.jinja renders for a list of messages."""
        ids = list(self._bos)
        head = self._head[len(self._bos):]
        for user, answer in turns:
            ids += head + self.tokenizer.encode(user) + self._tail + self.response_ids(answer)
        return ids + head + self.tokenizer.encode(prompt) + self._tail

    def response_ids(self, response: str) -> list[int]:
        return self.tokenizer.encode(response) + [self.tokenizer.eos_id]

    def answer_ids(self, prompt: str, response: str) -> list[int]:
        """The ids that follow `prompt`'s ids in a training row: the answer, closed by EOS
        (with our template they do not depend on the prompt)."""
        return self.response_ids(response)

    def fit_response(self, prompt_ids: list[int], response_ids: list[int], max_len: int) -> list[int]:
        """Cut a response so prompt + response fit max_len (SPIN: the prompt is fixed by generation)."""
        room = max_len - len(prompt_ids)
        if len(response_ids) > room:
            self.stats.responses_truncated += 1
            response_ids = response_ids[:max(room, 0)]
        return response_ids

    def encode_example(self, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) within max_len: the prompt's start is cut first (keeping the
        template head and tail and at least one prompt token), then the response's end."""
        parts, response_ids = self.prompt_parts(prompt), self.answer_ids(prompt, response)
        fixed = len(parts[0]) + len(parts[2])
        if max_len - fixed < 1:
            raise ValueError(f"max length {max_len} leaves no room after the template's "
                             f"{fixed} header tokens")
        room = max(max_len - fixed - len(response_ids), min(len(parts[1]), 1))
        prompt_ids = self._cut_prompt(parts, room)
        return prompt_ids, self.fit_response(prompt_ids, response_ids, max_len)


def sft_row(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training row: labels are the next token, -100 on the prompt."""
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids + [IGNORE_INDEX]
    return ids, labels[:len(ids)]


def pad_right(rows: list[list[int]], value: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [value] * (width - len(r)) for r in rows]
