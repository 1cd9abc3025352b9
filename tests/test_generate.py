"""Batched KV-cache generation (finetune/generate.py) against full recomputation, and resume."""
import collections
import json
import math

import pytest
import torch

from finetune.generate import generate_batch, generate_to_file, merge_generation_files, rank_slice
from model import Config, Llama


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(Config.from_name("tiny"), kernels="torch").eval()


def greedy_by_recompute(model, prompt, n, eos):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == eos:
                break
    return out


def test_batched_greedy_matches_token_by_token_recompute():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    # pick an EOS the model actually emits for one row, so per-row stopping is exercised
    eos = greedy_by_recompute(model, prompts[0], 5, eos=-1)[2]
    out = generate_batch(model, prompts, max_new_tokens=12, eos_id=eos, pad_id=0)
    for p, o in zip(prompts, out):
        assert o == greedy_by_recompute(model, p, 12, eos)
    assert out[0][-1] == eos and len(out[0]) <= 3


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = tiny_model()
    prompts = [[5, 6, 7], [9, 10]]
    a = generate_batch(model, prompts, 8, eos_id=2, pad_id=0, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    b = generate_batch(model, prompts, 8, eos_id=2, pad_id=0, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    assert a == b
    greedy = generate_batch(model, prompts, 8, eos_id=2, pad_id=0)
    nucleus = generate_batch(model, prompts, 8, eos_id=2, pad_id=0, temperature=1.0, top_p=1e-6,
                             generator=torch.Generator().manual_seed(4))
    assert nucleus == greedy


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are the same table at every position, so
    generate_batch's sampler can be checked against a distribution known in closed form."""

    def __init__(self, logits):
        super().__init__()
        self.table = logits
        self.lm_head = torch.nn.Linear(1, 1)
        self.config = Config.from_name("tiny")

    def make_kv_cache(self, batch_size, length):
        return None

    def forward(self, ids, **_):
        return self.table.expand(ids.shape[0], 1, -1)


# Token probabilities (summing to 1) placed out of order, so a sampler that returned a
# position in the sorted order instead of the token id would be caught.
PROBS = {3: 0.40, 0: 0.25, 5: 0.15, 1: 0.10, 4: 0.06, 2: 0.04}


@pytest.mark.parametrize("temperature,top_p,kept", [
    (1.0, 0.7, [3, 0, 5]),     # 0.40 + 0.25 < 0.7 <= 0.40 + 0.25 + 0.15: three tokens make the nucleus
    (1.0, 0.6, [3, 0]),        # 0.40 < 0.6 <= 0.40 + 0.25: two tokens
    (1.0, 1.0, [3, 0, 5, 1, 4, 2]),
    (0.5, 0.9, [3, 0, 5]),     # p^2 renormalised: 0.615, 0.240, 0.086 (0.855 < 0.9), 0.038, ...
])
def test_sampling_frequencies_follow_the_nucleus(temperature, top_p, kept):
    logits = torch.full((6,), float("-inf"))
    for token, p in PROBS.items():
        logits[token] = math.log(p)
    want = {t: PROBS[t] ** (1 / temperature) for t in kept}
    want = {t: q / sum(want.values()) for t, q in want.items()}
    n = 20_000
    out = generate_batch(FixedLogits(logits), [[1]] * n, max_new_tokens=1, eos_id=99, pad_id=0,
                         temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(5))
    counts = collections.Counter(ids[0] for ids in out)
    assert set(counts) == set(kept)  # nothing outside the nucleus is ever drawn
    for token, q in want.items():
        # binomial standard deviation is at most 0.0036 here; 0.015 is > 4 of them
        assert abs(counts[token] / n - q) < 0.015, (token, counts[token] / n, q)


def test_generate_to_file_resumes_without_duplicates(tmp_path):
    model = tiny_model()
    items = [(i, [3 + i, 4 + i, 5]) for i in range(7)]
    path = tmp_path / "gen.rank0.jsonl"
    kw = dict(max_new_tokens=4, eos_id=2, pad_id=0, batch_size=3, disable_progress=True)
    generate_to_file(model, items[:4], path, **kw)
    with path.open("a") as f:
        f.write('{"index": 5, "generated_ids": [1')  # torn write from a crash
    stats = generate_to_file(model, items, path, **kw)
    assert stats["new_rows"] == 3
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(7))
    merged = merge_generation_files([path], tmp_path / "gen.jsonl", expected=list(range(7)))
    assert [r["index"] for r in merged] == list(range(7))
    assert merged[3]["generated_ids"] == generate_batch(model, [items[3][1]], 4, 2, 0)[0]


def test_rank_slices_are_contiguous_and_cover():
    parts = [rank_slice(10, r, 3) for r in range(3)]
    assert [i for p in parts for i in p] == list(range(10))


def _write_rows(path, indices):
    path.write_text("".join(json.dumps({"index": i, "generated_ids": [5, i], "stopped": False}) + "\n"
                            for i in indices))
    return path


@pytest.mark.parametrize("rank0,rank1,message", [
    ([0, 1, 2], [3, 4, 3], r"rank1.jsonl: prompt index 3 appears twice \(also in .*rank1.jsonl\)"),
    ([0, 1, 2, 3], [3, 4], r"rank1.jsonl: prompt index 3 appears twice \(also in .*rank0.jsonl\)"),
    ([0, 1, 2], [3, 4, 7], r"rank1.jsonl: prompt index 7 is not one of this run's 5 prompts"),
], ids=["twice in one file", "in two files", "extra index"])
def test_merge_refuses_duplicate_and_extra_indices(tmp_path, rank0, rank1, message):
    parts = [_write_rows(tmp_path / "generations.rank0.jsonl", rank0),
             _write_rows(tmp_path / "generations.rank1.jsonl", rank1)]
    out = tmp_path / "generations.jsonl"
    with pytest.raises(ValueError, match=message) as err:
        merge_generation_files(parts, out, expected=list(range(5)))
    assert "generations.rank*.jsonl to generate them again" in str(err.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in parts]


def test_merge_of_two_ranks_is_in_prompt_order(tmp_path):
    parts = [_write_rows(tmp_path / "generations.rank0.jsonl", [2, 0, 1]),
             _write_rows(tmp_path / "generations.rank1.jsonl", [4, 3])]
    merged = merge_generation_files(parts, tmp_path / "generations.jsonl", expected=list(range(5)))
    assert [r["index"] for r in merged] == list(range(5))
    on_disk = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert on_disk == merged and [r["generated_ids"] for r in merged] == [[5, i] for i in range(5)]
