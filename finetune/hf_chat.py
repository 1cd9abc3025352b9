"""SFT and SPIN with an HF checkpoint's own chat template (TinyLlama-Chat, zephyr, SmolLM2, Llama-3, ...).

When --ckpt brings a Jinja chat template (finetune/conversation.py `HFChatTemplate`), prompts
and training rows are that template's text, tokenized as transformers' apply_chat_template(...,
tokenize=True) does, with the tokenizer's BOS first where the template writes none
(`JinjaFormat.chat_ids`: the models were trained with it):

    prompt ids  = ids(render([system?, user], add_generation_prompt=True))   generation starts here
    row ids     = ids(render([system?, user, assistant]))                     the full conversation
    answer ids  = the row ids after the prompt ids, up to and including the end-of-turn token

The end-of-turn token is the special token the template writes right after the answer
(`<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3, EOS for zephyr): the last trained token,
and one of the ids generation stops on (`stop_ids`, with the tokenizer's EOS ids). A template
that writes no special token after the answer is refused (the model could not learn to stop).

The prompt ids must be exactly the first tokens of the row ids, or the model would be trained
after a prompt that generation never gives it. A template breaks this when its generation
prompt ends inside a token (e.g. "ASSISTANT: ", whose trailing space merges with the answer's
first word) or is not the start of the assistant's turn; it is refused before any data is read,
with the template's file and the first differing token. What the template writes after the
end-of-turn token (ChatML and zephyr: "\n", the start of the next turn) is not trained:
generation stops there, so a real and a generated answer (SPIN's pair) both end with it and
nothing else; more than whitespace after it is refused.

Truncation works as with our template (finetune/chat.py `ChatEncoder`): a prompt's ids are
(template head, the message's tokens, template tail), where head and tail are the tokens the
prompt shares with the prompt of an empty message; a long prompt loses the start of the
middle part, and a long answer its end. `system` (scripts/chat.py --system) puts a system
message before every prompt; without it, a template such as SmolLM2's writes its default one.
"""
from __future__ import annotations

from data_prep.tokenizer import Tokenizer
from finetune.chat import ChatEncoder, ChatTemplate
from finetune.conversation import PROBE, HFChatTemplate, messages_of


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
        if self.format.end_of_turn is None:
            eos = self.tokenizer.eos_id
            raise ValueError(f"{self.template.source}: the chat template does not close the assistant's answer "
                             f"with eos_token or another special token: rendered, the answer {PROBE[1]!r} is "
                             f"followed by no special token. Generation stops at the end-of-turn token, so a "
                             f"training answer must end with it; fix: add `+ eos_token` (id {eos}, "
                             f"{self.tokenizer.id_to_token(eos)!r}) after message['content'] in the template's "
                             f"assistant turn")
        self._empty_prompt = self._ids([{"role": "user", "content": ""}], True)
        self.split(*PROBE)

    @property
    def end_of_turn(self) -> int:
        return self.format.end_of_turn

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.format.stop_ids

    def _ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        if self.system is not None:
            messages = [{"role": "system", "content": self.system}] + messages
        return self.format.chat_ids(self.format.render_messages(messages, add_generation_prompt))

    def prompt_parts(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        ids = self._ids([{"role": "user", "content": prompt}], True)
        head = _common_prefix(ids, self._empty_prompt)
        # The tail is at most what is left after the head in both, so head and tail never overlap.
        room = min(len(ids), len(self._empty_prompt)) - head
        tail = min(_common_prefix(ids[::-1], self._empty_prompt[::-1]), room)
        return ids[:head], ids[head:len(ids) - tail], ids[len(ids) - tail:]

    def conversation_ids(self, turns: list[tuple[str, str]], prompt: str) -> list[int]:
        return self.format.ids(turns, prompt, self.system)

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
        rest, eot = row[len(prompt_ids):], self.end_of_turn
        if eot not in rest:
            raise ValueError(f"{self.template.source}: rendered, the answer {response!r} is "
                             f"{self.tokenizer.decode(rest)!r} ({rest}), without the end-of-turn token "
                             f"{self.tokenizer.id_to_token(eot)!r} (id {eot}) the template writes after other answers")
        # The last end-of-turn token closes the answer (one written inside the answer's text stays part of it).
        end = len(rest) - rest[::-1].index(eot)
        special = self.tokenizer.special_ids | set(self.format.special_ids.values())
        after = rest[end:]
        if any(i in special for i in after) or self.tokenizer.decode(after).strip():
            shown = [self.tokenizer.id_to_token(i) for i in after]
            raise ValueError(f"{self.template.source}: the chat template writes {shown} after the assistant's "
                             f"end-of-turn token {self.tokenizer.id_to_token(eot)!r}; generation stops there, so only "
                             f"whitespace may follow it (it is not trained); fix: end the assistant's turn with it")
        return prompt_ids, rest[:end]

    def _not_a_prefix(self, prompt: str, response: str, prompt_ids: list[int], row: list[int]) -> str:
        at = _common_prefix(prompt_ids, row)

        def around(ids: list[int]) -> str:
            shown = [f"{i}:{self.tokenizer.id_to_token(i)!r}" for i in ids[max(at - 3, 0):at + 3]]
            return ("... " if at > 3 else "") + " ".join(shown) + (" ..." if len(ids) > at + 3 else "")

        prompt_text = self.format.render_messages(messages_of([], prompt, self.system), True)
        row_text = self.format.render_messages(messages_of([(prompt, response)], None, self.system), False)
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


def chat_encoder(tokenizer: Tokenizer, template: ChatTemplate | HFChatTemplate,
                 system: str | None = None) -> ChatEncoder:
    """The encoder for a checkpoint's template: ours, or its HF Jinja template (with `system`
    before every prompt, which only an HF template can hold)."""
    if isinstance(template, HFChatTemplate):
        return JinjaChatEncoder(tokenizer, template, system=system)
    return ChatEncoder(tokenizer, template, system=system)
