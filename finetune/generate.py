"""Batched KV-cache generation with our Llama, written incrementally and resumable.

`generate_batch` decodes a batch of prompts of different lengths at once: prompts are
LEFT-padded, padding slots are marked invalid in the KV cache and every row gets its own RoPE
positions (0 at its first real token), so each row computes exactly what it would alone.
Greedy, or temperature / top-p sampling from a seeded generator; each row stops at EOS, or at
any of several stop ids (a tokenizer's generation_config eos list, a template's end-of-turn).
After the prompt is read (one forward of the whole batch), every decoding step has the same
shapes (one token per row, attention over the cache's full length with invalid slots
masked), so on CUDA the step is captured once in a CUDA graph and replayed: decoding a 1B
model is otherwise bound by the host launching hundreds of small kernels per token.

`generate_to_file` runs it over many prompts, keyed by prompt index: rows are appended
(and flushed) one batch at a time to a jsonl file, a re-run skips indices already there and
drops a half-written last line, so an interrupted run resumes without duplicates. With
several ranks each takes a contiguous slice of the prompts into its own file and
`merge_generation_files` writes one file in prompt order, checking that every prompt has
exactly one generation.

Limitation: each rank holds a full (unsharded) copy of the model while generating; fine up
to a few billion parameters on one GPU, not for models that only fit sharded.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from last-position logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeStep:
    """One decoding step (a token per row -> next-token logits) with fixed shapes and buffers.

    Call it with the tokens (B,) and positions (B, 1) of step t: it writes cache slot
    `first_slot + t`. With `cuda_graph`, the first call warms the step up on a side stream
    (Triton compiles, cuBLAS picks its kernels), captures it, and every call replays it; the
    returned logits live in the graph's output buffer until the next call.
    """

    def __init__(self, model, cache, batch_size: int, first_slot: int, cuda_graph: bool):
        device = model.lm_head.weight.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), first_slot, dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph
        self.graph, self.logits = None, None

    def _forward(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache, positions=self.positions, cache_slots=self.slot,
                          last_logits_only=True)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions)
        if not self.cuda_graph:
            logits = self._forward()
        else:
            if self.graph is None:
                # Warm-up steps write this step's own keys/values, so they leave nothing behind.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward()
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._forward()
            self.graph.replay()
            logits = self.logits
        self.slot += 1
        return logits


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id, pad_id: int,
                   temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, cuda_graph: bool | None = None,
                   on_token=None) -> list[list[int]]:
    """Generated ids per prompt (the stop id included when the row stopped on one).

    `eos_id` is one id or a sequence of them: a row stops on any.

    `cuda_graph` (default: on CUDA) replays the decoding step from a CUDA graph.
    `on_token(tokens)`, when given, sees each step's (B,) tensor of new ids as soon as it is
    sampled (streaming to a terminal); an exception it raises stops decoding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch needs at least one prompt and no empty prompt")
    device = model.lm_head.weight.device
    B, width = len(prompts), max(len(p) for p in prompts)
    if width + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt of {width} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"({model.config.block_size}); truncate prompts to block_size - max_new_tokens")
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = True
    ids, mask = ids.to(device), mask.to(device)
    stops = stop_list(eos_id)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.make_kv_cache(B, width + max_new_tokens)
    logits = model(ids, cache=cache, positions=positions, attention_mask=mask, last_logits_only=True)
    next_pos = mask.long().sum(-1, keepdim=True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    decode = DecodeStep(model, cache, B, first_slot=width, cuda_graph=use_graph)
    steps = []
    for step in range(max_new_tokens):
        tok = _sample(logits[:, -1], temperature, top_p, generator)
        tok = tok.masked_fill(finished, pad_id)  # rows already done keep feeding padding
        steps.append(tok)
        if on_token is not None:
            on_token(tok)
        finished |= torch.isin(tok, stop_tensor)
        # Asking the device whether every row is done waits for it: do it every 8 steps only
        # (extra steps after the last EOS only add padding, which is cut off below), or every
        # step when streaming, whose callback waits for each token anyway.
        check = step % 8 == 7 or on_token is not None
        if step == max_new_tokens - 1 or (check and bool(finished.all())):
            break
        logits = decode(tok, next_pos)
        next_pos = next_pos + 1
    out = torch.stack(steps, dim=1).tolist()
    result = []
    for row in out:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        result.append(row if end is None else row[:end + 1])
    return result


def stop_list(eos_id) -> list[int]:
    """One stop id or several, as a list."""
    return [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]


# ---- incremental, resumable files ---------------------------------------------------------
def read_jsonl_rows(path: Path) -> list[dict]:
    """Rows already written, in file order; a torn last line (crash mid-write) is cut off the file."""
    rows: list[dict] = []
    if not path.is_file():
        return rows
    data = path.read_bytes()
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: the last write was interrupted
        line = data[pos:nl]
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        rows.append(row)
        pos = good_end = nl + 1
    if good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return rows


def read_jsonl_resumable(path: Path) -> dict[int, dict]:
    """Rows already written, by "index" (see read_jsonl_rows)."""
    return {int(row["index"]): row for row in read_jsonl_rows(path)}


def rank_slice(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of range(n) that `rank` handles."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def generate_to_file(model, items: list[tuple[int, list[int]]], path: str | os.PathLike, *,
                     max_new_tokens: int, eos_id, pad_id: int, batch_size: int = 16,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     decode=None, desc: str = "generate", disable_progress: bool = False) -> dict:
    """Generate for (index, prompt_ids) items into `path`, skipping indices already there.

    Returns {"new_rows", "tokens", "seconds", "tokens_per_s"} for this run. `eos_id`: one stop
    id or several; a row's "stopped" says it ended on one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl_resumable(path)
    stops = stop_list(eos_id)
    # Longest first and a fixed partition into batches: little padding, and the same batches
    # (so the same sampled tokens for a given seed) whether or not the run was resumed.
    order = sorted(items, key=lambda it: (-len(it[1]), it[0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    todo = sum(1 for it in order if it[0] not in done)
    stats = {"new_rows": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}
    bar = tqdm(total=len(order), initial=len(order) - todo, desc=desc, unit="prompt", disable=disable_progress)
    device = model.lm_head.weight.device
    start = time.perf_counter()
    with path.open("a", encoding="utf-8") as f:
        for batch in batches:
            todo_rows = [it for it in batch if it[0] not in done]
            if not todo_rows:
                continue
            gen = None
            if temperature > 0:
                gen = torch.Generator(device=device)
                gen.manual_seed((seed * 1_000_003 + batch[0][0]) % (2 ** 63))
            # A batch cut off part-way (a kill during its write) is generated again whole, with
            # the same seed and the same rows beside each other, so its missing rows are those
            # an uninterrupted run wrote; only they are appended.
            outs = generate_batch(model, [p for _, p in batch], max_new_tokens, eos_id, pad_id,
                                  temperature=temperature, top_p=top_p, generator=gen)
            lines = []
            for (index, _), ids in zip(batch, outs):
                if index in done:
                    continue
                row = {"index": index, "generated_ids": ids, "stopped": bool(ids) and ids[-1] in stops}
                if decode is not None:
                    row["text"] = decode(ids)
                lines.append(json.dumps(row) + "\n")
                stats["tokens"] += len(ids)
            f.write("".join(lines))  # one write per batch, then flush: a crash loses at most this batch
            f.flush()
            os.fsync(f.fileno())
            stats["new_rows"] += len(todo_rows)
            stats["seconds"] = time.perf_counter() - start
            stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
            bar.update(len(todo_rows))
            bar.set_postfix(tok_s=f"{stats['tokens_per_s']:.0f}")
    bar.close()
    return stats


def merge_generation_files(parts: list[Path], out: Path, expected: list[int]) -> list[dict]:
    """One file, in prompt order, from the ranks' files; every expected index exactly once.

    A duplicated index (two answers for one prompt: which one is meant?) or an index that is
    not one of this run's prompts means the files were not all written by this run, e.g. a
    resume with a different number of ranks; both are errors, and `out` is not written.
    """
    wanted = set(expected)
    rows: dict[int, dict] = {}
    source: dict[int, Path] = {}
    redo = f"delete {Path(parts[0]).parent}/generations.rank*.jsonl to generate them again" if parts else ""
    for part in parts:
        for row in read_jsonl_rows(part):
            index = int(row["index"])
            if index in rows:
                raise ValueError(f"{part}: prompt index {index} appears twice (also in {source[index]}); each prompt "
                                 f"must have exactly one generation (was the run resumed with a different number "
                                 f"of ranks?); {redo}")
            if index not in wanted:
                raise ValueError(f"{part}: prompt index {index} is not one of this run's {len(wanted)} prompts; "
                                 f"the file holds generations from another run; {redo}")
            rows[index], source[index] = row, part
    missing = [i for i in expected if i not in rows]
    if missing:
        raise RuntimeError(f"generations for {len(missing)} prompt(s) missing (e.g. index {missing[0]}) "
                           f"in {[str(p) for p in parts]}; re-run to resume")
    merged = [rows[i] for i in sorted(expected)]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in merged:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    return merged
