"""finetune/spin.py's training schedule and bookkeeping through the command line: the decay
length (--schedule-epochs) apart from the stopping point (--epochs, --max-steps), the per-epoch
saves, and one metrics step that runs on across iterations and restarts."""
import json

import pytest
import torch
import yaml

from model import Llama
from pretrain.schedule import lr_at
from test_finetune_cli_errors import SPIN_SMALL, chat, ckpts, refused, run  # noqa: F401  (the same tiny fixtures)


def flags(**changes):
    """SPIN_SMALL (1 iteration, 16 prompts, batch 8: 2 steps per epoch) with some flags changed."""
    out = [str(a) for a in SPIN_SMALL]
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def train_rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"rewards/margins"' in l]


def test_epochs_stop_before_the_schedule_ends_and_are_saved(ckpts, chat, tmp_path):
    out = tmp_path / "spin"
    result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out,
                 *flags(epochs=2, schedule_epochs=4, lr=1e-3, warmup_ratio=0.25))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = train_rows(out)
    # 2 steps per epoch: 4 steps run out of a schedule of 8 (warmup 2), so the lr is still high at the end
    assert [r["lr"] for r in rows] == [lr_at(s, 1e-3, 0.0, 2, 8, "linear") for s in range(4)]
    assert rows[-1]["lr"] > 0.5e-3
    epoch1 = Llama.load(out / "iter1" / "epoch1")
    assert not (out / "iter1" / "epoch2").exists()  # the last epoch is iter1 itself
    assert not torch.equal(epoch1.lm_head.weight, Llama.load(out / "iter1").lm_head.weight)
    assert not torch.equal(epoch1.lm_head.weight, Llama.load(ckpts["ok"]).lm_head.weight)
    assert not list((out / "work" / "iter0").glob("epoch*"))


def test_max_steps_does_not_shorten_the_decay(ckpts, chat, tmp_path):
    out = tmp_path / "spin"
    result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out,
                 *flags(epochs=2, schedule_epochs=2, max_steps=3, lr=1e-3, warmup_ratio=0))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["lr"] for r in train_rows(out)] == [lr_at(s, 1e-3, 0.0, 0, 4, "linear") for s in range(3)]


def test_epochs_beyond_the_schedule_are_refused(ckpts, chat, tmp_path):
    result = refused("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", tmp_path / "o",
                     *flags(epochs=3, schedule_epochs=2))
    assert result.returncode == 2 and "--epochs 3 is beyond --schedule-epochs 2" in result.stderr


@pytest.mark.slow
def test_one_metrics_step_across_iterations_and_a_crashed_restart(ckpts, chat, tmp_path):
    """Iteration 1's training blows up (lr 1e30: non-finite after its first update, stopped by
    --max-skipped-steps 1) and is re-run with a sane lr: its rows from the crashed attempt are
    replaced, steps count on from iteration 0's, never go backwards, and no row is duplicated."""
    out = tmp_path / "spin"
    common = ["--ckpt", ckpts["ok"], "--data", chat, "--out", out]
    assert run("spin.py", *common, *flags(epochs=2, schedule_epochs=2)).returncode == 0  # iteration 0: 4 steps
    crashed = run("spin.py", *common, *flags(iterations=2, epochs=2, schedule_epochs=2, lr=1e30,
                                             lr_later=1e30, max_skipped_steps=1))
    assert crashed.returncode == 2 and "non-finite" in crashed.stderr, crashed.stderr[-2000:]
    before = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["iteration"] == 1 and "rewards/margins" in r for r in before)  # the crashed attempt logged
    resumed = run("spin.py", *common, *flags(iterations=2, epochs=2, schedule_epochs=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(r["iteration"], r["step"]) for r in rows if "rewards/margins" in r]
    # iteration 1 trains on its pairs and iteration 0's: 32 pairs, 4 steps per epoch
    assert train == [(0, s) for s in range(1, 5)] + [(1, s) for s in range(5, 13)]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    assert all(r["lr"] < 1 for r in rows if "lr" in r)  # the crashed attempt's rows are gone
    assert [r["iteration"] for r in rows if "pairs/pairs" in r] == [0, 1]  # the stages' rows are kept, once
    assert json.loads((out / "state.json").read_text()) == {"completed_iterations": 2, "global_step": 12}


@pytest.mark.slow
def test_activation_checkpointing_trains_the_same(ckpts, chat, tmp_path):
    """--activation-checkpointing (SFT and SPIN) recomputes blocks in backward: same losses."""
    losses = {}
    for name, extra in (("plain", []), ("checkpointed", ["--activation-checkpointing"])):
        out = tmp_path / name
        result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", out, *flags(epochs=2), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [r["loss"] for r in train_rows(out)]
        recomputed = yaml.safe_load((out / "config.yaml").read_text())["resolved"]["activation_checkpointing"]
        assert recomputed == ("2 of 2 blocks" if extra else "0 of 2 blocks"), name
    assert len(losses["plain"]) == 4
    assert losses["checkpointed"] == pytest.approx(losses["plain"], rel=1e-5)
    sft = run("sft.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", tmp_path / "sft", "--max-steps", 1,
              "--global-batch-size", 8, "--micro-batch-size", 4, "--activation-checkpointing")
    assert sft.returncode == 0, sft.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert saved["options"]["activation_checkpointing"] is True
    assert saved["resolved"]["activation_checkpointing"] == "2 of 2 blocks"  # what the model really does


@pytest.mark.slow
def test_lr_later_from_the_drop_iteration_and_previous_pairs(ckpts, chat, tmp_path):
    """docs/spin.md: iteration t trains at --lr before --lr-drop-iteration and at --lr-later from it
    on, and from iteration 1 on the training data is this iteration's pairs plus the previous
    iteration's unless --no-previous-pairs. 16 pairs an iteration, 8 per step, 1 epoch: iteration 1
    takes 4 steps with the previous pairs and 2 without."""
    runs = {}
    for name, extra in (("both", []), ("own", ["--no-previous-pairs"])):
        runs[name] = tmp_path / name
        result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", runs[name], *extra,
                     *flags(iterations=2, lr=1e-3, lr_later=2e-4, lr_drop_iteration=1, warmup_ratio=0,
                            lr_schedule="constant"))
        assert result.returncode == 0, result.stderr[-3000:]
    for name, later_steps in (("both", 4), ("own", 2)):
        rows = train_rows(runs[name])
        assert [(r["iteration"], r["lr"]) for r in rows] == [(0, 1e-3)] * 2 + [(1, 2e-4)] * later_steps, name
