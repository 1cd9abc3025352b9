"""SPIN's inputs besides the model: which prompts an iteration answers, and given pairs.

    sample_rows       --num-prompts N: a random sample of N rows seeded by --seed (the paper
                      answered a random 50k of UltraChat's prompts), kept in file order
    read_pairs        --pairs FILE: pairs in the layout of SPIN's released data
                      (UCLA-AGI/SPIN_iter0), jsonl or parquet, one row per prompt:
                          {"real":      [{"role": "user", "content": P}, {"role": "assistant", "content": Y}],
                           "generated": [{"role": "user", "content": P}, {"role": "assistant", "content": Y'}]}
                      Both lists hold the same messages up to the final assistant answer.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from finetune.chat import ChatExample, read_rows


def sample_rows(total: int, n: int, seed: int) -> list[int]:
    """Positions of a seeded random sample of `n` of `total` rows (all if there are fewer), ascending."""
    if n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def reindex(examples: list[ChatExample], rows: list[int]) -> list[ChatExample]:
    """The chosen rows, re-indexed 0..n-1 (the index keys generation rows); prompt_id keeps the row's id."""
    return [dataclasses.replace(examples[r], index=i) for i, r in enumerate(rows)]


def _answer_and_prompt(messages, where: str, field: str) -> tuple[list[dict], str]:
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: field '{field}' must be a list of {{role, content}} messages: the prompt, "
                         f"then the assistant's answer")
    if messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise ValueError(f"{where}: the last message of '{field}' must be the assistant's answer "
                         f"(role 'assistant', string content)")
    return messages[:-1], messages[-1]["content"]


def read_pairs(path: str | Path) -> tuple[list[ChatExample], list[str]]:
    """(examples with the prompt and the real answer, the generated answers) of a --pairs file."""
    path = Path(path)
    examples, generated = [], []
    for line, row in read_rows(path, columns=("real", "generated")):
        where = f"{path}:{line}" if path.suffix != ".parquet" else f"{path} row {line}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with fields 'real' and 'generated'")
        context, real = _answer_and_prompt(row.get("real"), where, "real")
        other, gen = _answer_and_prompt(row.get("generated"), where, "generated")
        if [(m.get("role"), m.get("content")) for m in context] != [(m.get("role"), m.get("content")) for m in other]:
            raise ValueError(f"{where}: 'real' and 'generated' must share the messages before the answer "
                             f"(the same prompt)")
        if len(context) != 1 or context[0].get("role") != "user" or not isinstance(context[0].get("content"), str):
            raise ValueError(f"{where}: the prompt must be one user message (a single-turn pair, as in "
                             f"SPIN's released data); got roles {[m.get('role') for m in context]}")
        prompt_id = row.get("prompt_id")
        examples.append(ChatExample(index=len(examples), prompt_id=str(prompt_id if prompt_id is not None else line),
                                    prompt=context[0]["content"], response=real))
        generated.append(gen)
    if not examples:
        raise ValueError(f"{path}: no pairs found")
    return examples, generated
