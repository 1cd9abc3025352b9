"""finetune/spin.py's recipe options, each through the command line and what it changes:
--capped-generations (keep/eos/drop, counted), --warmup-steps (in steps an iteration reaches),
--iteration-steps (every iteration the same number of optimizer steps),
--carry-optimizer-state (iteration t+1 starts from iteration t's final optimizer state), and
--temperature/--top-p (the opponent sampled at T 1, greedy at T 0)."""
import json
import types

import pytest
import torch

from model import Llama
from test_finetune_cli_errors import SPIN_SMALL, chat, ckpts, run, save_ckpt  # noqa: F401  (the same tiny fixtures)
from test_spin_schedule import flags, train_rows

EOS = 2  # the tiny sentencepiece tokenizer's </s>, the end of every answer in our template


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spin(ckpts, chat, out, *extra, **changes):
    result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *flags(**changes), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --capped-generations ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sometimes_stops(tmp_path_factory, tiny_tokenizer):
    """A model that samples EOS with probability 1/4 at every position, any other token
    uniformly: about a third of its 4-token answers are capped (0.75^4), the rest stop.
    (Every position's hidden state is the same vector of ones: the blocks add nothing, every
    token embeds to ones, the final norm keeps them; lm_head is zero but for EOS's row.)"""
    import math

    def edit(model):
        for name, p in model.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                p.zero_()
        model.embed.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        vocab, width = model.lm_head.weight.shape
        model.lm_head.weight[EOS] = math.log((vocab - 1) / 3) / width  # e^a / (e^a + V - 1) = 1/4

    return save_ckpt(tmp_path_factory.mktemp("stops") / "ckpt", tiny_tokenizer, edit=edit)


# keep is the behaviour the other spin tests already run; eos and drop stay in the fast tier.
@pytest.mark.parametrize("policy", [pytest.param("keep", marks=pytest.mark.slow), "eos", "drop"])
def test_capped_generations(sometimes_stops, chat, tmp_path, policy):
    """keep: the pair holds the cut-off answer; eos: it ends with EOS; drop: no pair. Counted each way."""
    out = tmp_path / policy
    spin({"ok": sometimes_stops}, chat, out, "--capped-generations", policy, max_steps=1)
    generations = {r["index"]: r for r in read_jsonl(out / "work" / "iter0" / "generations.jsonl")}
    capped = {i for i, r in generations.items() if not r["stopped"]}
    assert 0 < len(capped) < len(generations)
    pairs = {p["index"]: p for p in read_jsonl(out / "work" / "iter0" / "pairs.jsonl")}
    stats = json.loads((out / "work" / "iter0" / "pairs_stats.json").read_text())
    assert stats["generations_at_max_new_tokens"] == len(capped) and stats["capped_generations"] == policy
    if policy == "drop":
        assert not capped & set(pairs)
        assert stats["dropped_capped"] == len(capped) and stats["capped_ended_with_eos"] == 0
        assert stats["pairs"] == len(generations) - len(capped) - stats["dropped_identical"] - stats["dropped_empty"]
    else:
        assert capped <= set(pairs)
        for i in capped:
            cut = generations[i]["generated_ids"]
            assert len(cut) == 4 and cut[-1] != EOS
            assert pairs[i]["generated_ids"] == (cut + [EOS] if policy == "eos" else cut)
        assert stats["dropped_capped"] == 0
        assert stats["capped_ended_with_eos"] == (len(capped) if policy == "eos" else 0)
    for i in set(pairs) - capped:  # answers that stopped are never changed
        assert pairs[i]["generated_ids"] == generations[i]["generated_ids"]
    logged = [r for r in read_jsonl(out / "metrics.jsonl") if "pairs/dropped_capped" in r]
    assert [(r["pairs/generations_at_max_new_tokens"], r["pairs/dropped_capped"]) for r in logged] == \
        [(len(capped), stats["dropped_capped"])]


# --warmup-steps, --iteration-steps ----------------------------------------------------------
def test_warmup_steps_are_optimizer_steps_the_iteration_runs(ckpts, chat, tmp_path):
    """16 pairs, 8 per step: 2 steps per epoch, 4 in 2 epochs (a 2-epoch schedule). A 2-step
    warmup to 1e-3, then a linear decay over the remaining 2 steps: 5e-4, 1e-3, 1e-3, 5e-4.
    (With --warmup-ratio 0.1 this iteration's warmup would round to 0 steps.)"""
    out = tmp_path / "spin"
    spin(ckpts, chat, out, "--warmup-steps", 2, epochs=2, schedule_epochs=2, lr=1e-3)
    assert [r["lr"] for r in train_rows(out)] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], rel=1e-12)

    refused = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", tmp_path / "long",
                  *flags(epochs=2, schedule_epochs=2), "--warmup-steps", 5)
    assert refused.returncode == 2
    assert "--warmup-steps 5 is beyond the 4 optimizer steps iteration 0 runs" in refused.stderr


@pytest.mark.slow
def test_iteration_steps_give_every_iteration_the_same_length(ckpts, chat, tmp_path):
    """--iteration-steps 5: iteration 0 (16 pairs, 2 steps a pass) and iteration 1 (its 16 +
    iteration 0's: 4 steps a pass) both run 5 steps, the schedule over those 5 (warmup 1, then
    linear to 0: 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4), going over the pairs again as needed."""
    out = tmp_path / "spin"
    spin(ckpts, chat, out, "--iteration-steps", 5, "--warmup-steps", 1, iterations=2, lr=1e-3, lr_later=1e-3)
    rows = train_rows(out)
    assert [r["iteration"] for r in rows] == [0] * 5 + [1] * 5
    expected = [1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4]
    assert [r["lr"] for r in rows] == pytest.approx(expected * 2, rel=1e-12)
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2] + [0, 0, 0, 0, 1]
    assert not list(out.rglob("epoch*"))  # no per-epoch saves: an iteration is not counted in epochs


@pytest.mark.parametrize("extra,message", [
    (["--iteration-steps", "4", "--max-steps", "2"], "give --iteration-steps"),
    (["--iteration-steps", "4", "--warmup-steps", "5"], "--warmup-steps 5 is beyond --iteration-steps 4"),
])
def test_contradictory_lengths_are_refused(extra, message, capsys):
    from finetune.spin import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--ckpt", "C", "--data", "D", "--out", "O", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


# --carry-optimizer-state --------------------------------------------------------------------
def saved_state(directory):
    """A saved optimizer state (torch.distributed.checkpoint directory) as a plain dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = directory.parent / f"{directory.name}.pt"
    dcp_to_torch_save(directory, target)
    return torch.load(target, weights_only=False)["optimizer"]


@pytest.mark.parametrize("name", ["rmsprop", "adamw"])
def test_saved_optimizer_state_loads_back_exactly(tmp_path, name):
    """What one iteration saves is what the next one's fresh optimizer holds after loading:
    every running average and the step count, bit for bit."""
    from finetune.optimizer_state import load_optimizer_state, save_optimizer_state
    from model import Config

    fabric = types.SimpleNamespace(global_rank=0, barrier=lambda: None)
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny"), kernels="torch")
    make = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW}[name]
    first = make(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randint(0, 512, (2, 8))).float().pow(2).mean().backward()
        first.step()
        first.zero_grad()
    save_optimizer_state(fabric, model, first, tmp_path / "state")
    fresh = make(model.parameters(), lr=1e-3)
    load_optimizer_state(fabric, model, fresh, tmp_path / "state")
    before = [first.state[p] for p in model.parameters()]
    after = [fresh.state[p] for p in model.parameters()]
    assert len(after) == len(before) and all(set(a) == set(b) for a, b in zip(after, before))
    for a, b in zip(after, before):
        for key in b:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert float(before[0]["step"]) == 3.0


@pytest.mark.slow
def test_optimizer_state_is_carried_across_iterations(ckpts, chat, tmp_path):
    """Two iterations of 3 steps with --carry-optimizer-state: iteration 1's optimizer counts on
    from iteration 0's 3 steps (6 at its end; a rebuilt one would end at 3), and iteration 0's
    running averages are in iteration 1's (RMSprop's square_avg decays from them, never restarts at 0)."""
    out = tmp_path / "spin"
    spin(ckpts, chat, out, "--iteration-steps", 3, "--carry-optimizer-state", iterations=2)
    first = saved_state(out / "work" / "iter0" / "optimizer_state")["state"]
    second = saved_state(out / "work" / "iter1" / "optimizer_state")["state"]
    assert set(first) == set(second) == {n for n, p in Llama.load(ckpts["ok"]).named_parameters()}
    assert {float(s["step"]) for s in first.values()} == {3.0}
    assert {float(s["step"]) for s in second.values()} == {6.0}

    rebuilt = tmp_path / "rebuilt"
    spin(ckpts, chat, rebuilt, "--iteration-steps", 3, iterations=2)
    assert not (rebuilt / "work" / "iter0" / "optimizer_state").exists()


def test_carrying_a_state_that_was_never_saved_is_refused(ckpts, chat, tmp_path):
    out = tmp_path / "spin"
    spin(ckpts, chat, out, max_steps=1)  # iteration 0 without the flag
    resumed = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out,
                  *flags(iterations=2, max_steps=1), "--carry-optimizer-state")
    assert resumed.returncode == 2
    assert f"{out / 'work' / 'iter0' / 'optimizer_state'}: no saved optimizer state" in resumed.stderr
    assert not (out / "iter2").exists()


# --temperature, --top-p ---------------------------------------------------------------------
def greedy(model, prompt, n):
    """Greedy decoding by full forwards (no KV cache): the reference for --temperature 0."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == EOS:
                break
    return ids[len(prompt):]


@pytest.mark.slow
def test_temperature_zero_is_greedy_and_one_samples(ckpts, chat, tmp_path):
    model = Llama.load(ckpts["ok"], kernels="torch").eval()
    answers = {}
    for name, extra in (("greedy", ["--temperature", 0]), ("tiny_top_p", ["--temperature", 1.0, "--top-p", 1e-6]),
                        ("t1_seed3", ["--temperature", 1.0, "--seed", 3]),
                        ("t1_seed4", ["--temperature", 1.0, "--seed", 4])):
        out = tmp_path / name
        spin(ckpts, chat, out, *extra, max_steps=1, num_prompts=24)
        answers[name] = {r["index"]: r["generated_ids"]
                         for r in read_jsonl(out / "work" / "iter0" / "generations.jsonl")}
        prompts = {p["index"]: p["prompt_ids"] for p in read_jsonl(out / "work" / "iter0" / "pairs.jsonl")}
    assert len(prompts) > 16
    reference = {i: greedy(model, p, 4) for i, p in prompts.items()}
    for name in answers:
        answers[name] = {i: answers[name][i] for i in prompts}
    assert answers["greedy"] == reference
    assert answers["tiny_top_p"] == reference  # a nucleus of one token is the argmax
    assert answers["t1_seed3"] != reference and answers["t1_seed3"] != answers["t1_seed4"]
