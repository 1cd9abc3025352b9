"""finetune/spin.py's training schedule and bookkeeping through the command line: the decay
length (--schedule-epochs) apart from the stopping point (--epochs, --max-steps), the per-epoch
saves, and one metrics step that runs on across iterations and restarts."""
import json

import torch

from model import Llama
from pretrain.schedule import lr_at
from test_finetune_cli_errors import SPIN_SMALL, chat, ckpts, run  # noqa: F401  (the same tiny fixtures)


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
    result = run("spin.py", "--ckpt", ckpts["ok"], "--data", chat, "--out", tmp_path / "o",
                 *flags(epochs=3, schedule_epochs=2))
    assert result.returncode == 2 and "--epochs 3 is beyond --schedule-epochs 2" in result.stderr
