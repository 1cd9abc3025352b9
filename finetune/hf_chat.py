"""SFT and SPIN with an HF checkpoint's own chat template (TinyLlama-Chat, zephyr, ...).

When --ckpt brings a Jinja chat template (finetune/conversation.py `HFChatTemplate`), prompts
and training rows are that template's text, tokenized as transformers' apply_chat_template(...,
tokenize=True) does, with BOS first where the template writes none (`JinjaFormat.chat_ids`: the
models were trained with it):

    prompt ids  = ids(render([user], add_generation_prompt=True))   what generation starts from
    row ids     = ids(render([user, assistant]))                     the full conversation
    answer ids  = the row ids after the prompt ids, up to and including the answer's EOS

The prompt ids must be exactly the first tokens of the row ids, or the model would be trained
after a prompt that generation never gives it. A template breaks this when its generation
prompt ends inside a token (e.g. "ASSISTANT: ", whose trailing space merges with the answer's
first word) or is not the start of the assistant's turn; it is refused before any data is read,
with the template's file and the first differing token. What the template writes after the
answer's EOS (zephyr: "\n", the start of the next turn) is not trained: generation stops at EOS,
so a real and a generated answer (SPIN's pair) both end with EOS and nothing else. A template
that does not close the answer with EOS, or writes more than whitespace after it, is refused.

Truncation works as with our template (finetune/chat.py `ChatEncoder`): a prompt's ids are
(template head, the message's tokens, template tail), where head and tail are the tokens the
prompt shares with the prompt of an empty message; a long prompt loses the start of the
middle part, and a long answer its end.
"""
from __future__ import annotations

from finetune.chat import ChatEncoder, ChatTemplate
from finetune.conversation import HFChatTemplate
from finetune.tokenizer import Tokenizer

# Rendered once when the encoder is made, so a template that cannot be split is refused at start.
PROBE = ("What is two plus two?", "Two plus two is four.")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class JinjaChatEncoder(ChatEncoder):
    """`ChatEncoder` with an HF Jinja template: the same calls, the template's ids."""

    def __post_init__(self):
        if not isinstance(self.template, HFChatTemplate):
            raise TypeError(f"JinjaChatEncoder needs an HFChatTemplate, got {type(self.template).__name__}")
        self.format = self.template.format(self.tokenizer)
        self._empty_prompt = self._ids([{"role": "user", "content": ""}], True)
        self.split(*PROBE)

    def _ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self.format.chat_ids(self.format.render_messages(messages, add_generation_prompt))

    def prompt_parts(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        ids = self._ids([{"role": "user", "content": prompt}], True)
        head = _common_prefix(ids, self._empty_prompt)
        # The tail is at most what is left after the head in both, so head and tail never overlap.
        room = min(len(ids), len(self._empty_prompt)) - head
        tail = min(_common_prefix(ids[::-1], self._empty_prompt[::-1]), room)
        return ids[:head], ids[head:len(ids) - tail], ids[len(ids) - tail:]

    def conversation_ids(self, turns: list[tuple[str, str]], prompt: str) -> list[int]:
        return self.format.ids(turns, prompt)

    def response_ids(self, response: str) -> list[int]:
        raise TypeError("with an HF chat template an answer's ids depend on its prompt: use answer_ids(prompt, response)")

    def answer_ids(self, prompt: str, response: str) -> list[int]:
        return self.split(prompt, response)[1]

    def split(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one exchange; ValueError if the template cannot be split."""
        user = {"role": "user", "content": prompt}
        prompt_ids = self._ids([user], True)
        row = self._ids([user, {"role": "assistant", "content": response}], False)
        if row[:len(prompt_ids)] != prompt_ids:
            raise ValueError(self._not_a_prefix(prompt, response, prompt_ids, row))
        rest, eos = row[len(prompt_ids):], self.tokenizer.eos_id
        if eos not in rest:
            raise ValueError(f"{self.template.source}: the chat template does not close the assistant's answer "
                             f"with eos_token (id {eos}): rendered, the answer {response!r} is "
                             f"{self.tokenizer.decode(rest)!r} ({rest}). Generation stops at EOS, so a training "
                             f"answer must end with it; fix: add `+ eos_token` after message['content'] in the "
                             f"template's assistant turn")
        # The last EOS closes the answer (an EOS written inside the answer's text stays part of it).
        end = len(rest) - rest[::-1].index(eos)
        after = self.tokenizer.sp.decode(rest[end:]) if rest[end:] else ""
        if after.strip():
            raise ValueError(f"{self.template.source}: the chat template writes {after!r} after the assistant's "
                             f"EOS; generation stops at EOS, so only whitespace may follow it (it is not "
                             f"trained); fix: end the assistant's turn with eos_token")
        return prompt_ids, rest[:end]

    def _not_a_prefix(self, prompt: str, response: str, prompt_ids: list[int], row: list[int]) -> str:
        at = _common_prefix(prompt_ids, row)
        sp = self.tokenizer.sp

        def around(ids: list[int]) -> str:
            shown = [f"{i}:{sp.id_to_piece(i)!r}" for i in ids[max(at - 3, 0):at + 3]]
            return ("... " if at > 3 else "") + " ".join(shown) + (" ..." if len(ids) > at + 3 else "")

        prompt_text = self.format.render_messages([{"role": "user", "content": prompt}], True)
        row_text = self.format.render_messages([{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": response}], False)
        return (f"{self.template.source}: the chat template cannot be split at a token boundary: SFT and SPIN need "
                f"the prompt's ids (add_generation_prompt=True; generation starts from them) to be exactly the first "
                f"ids of the conversation with the answer (the training row). For the message {prompt!r} and the "
                f"answer {response!r} the prompt has {len(prompt_ids)} tokens, and the two differ from token {at}:\n"
                f"  prompt:       {around(prompt_ids)}\n"
                f"  conversation: {around(row)}\n"
                f"  the prompt's text ends {prompt_text[-40:]!r}; the conversation's text there is "
                f"{row_text[max(len(prompt_text) - 40, 0):len(prompt_text) + 20]!r}\n"
                f"Fix: edit the template so that its generation prompt is exactly the start of the assistant's turn "
                f"and ends where a token ends (end it with a newline or a special token, not a space: a trailing "
                f"space merges with the answer's first word), or delete it from that file to train with the "
                f"project's own template (finetune/chat.py)")


def chat_encoder(tokenizer: Tokenizer, template: ChatTemplate | HFChatTemplate) -> ChatEncoder:
    """The encoder for a checkpoint's template: ours, or its HF Jinja template."""
    if isinstance(template, HFChatTemplate):
        return JinjaChatEncoder(tokenizer, template)
    return ChatEncoder(tokenizer, template)
