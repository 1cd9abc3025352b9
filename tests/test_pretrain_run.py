"""pretrain/tinyllama.py end to end on CPU, as users run it: as a file, in subprocesses.

Tolerance of the 1- vs 2-process parity: per-step losses within 1e-4 (absolute) and final
weights within 1e-4. Both runs start from the same weights and read the same global batches;
they differ only in float summation order (FSDP's reduce-scatter, the grad-norm all-reduce),
which measured ~1e-6 on the loss and ~5e-6 on the weights after 30 steps.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import fabric_run, run_main
from data_prep.shards import write_shard
from pretrain.data import MixtureSampler, SourceSpec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pretrain" / "tinyllama.py"
STEPS = 30


def learnable_corpus(directory: Path, seed: int, n_tokens: int = 20_000) -> Path:
    """Counting runs (t, t+1, t+2, ... mod 64) of random start and length: easy to learn."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        tokens = []
        while len(tokens) < n_tokens:
            start = int(rng.integers(64))
            tokens += [3 + (start + k) % 64 for k in range(int(rng.integers(8, 40)))] + [2]
        write_shard(directory / f"shard-{s:04d}.bin", np.array(tokens[:n_tokens]), vocab_size=512, eos_id=2,
                    num_docs=1)
    return directory


def env(tmp: Path) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_DIR=str(tmp), WANDB_SILENT="true")
    e.pop("LT_CLI_USED", None)
    return e


def base_args(data: Path, out: Path, *extra) -> list[str]:
    return ["--config", "tiny", "--data", f"{data / 'a'}:0.7", f"{data / 'b'}:0.3", "--out", str(out),
            "--max-steps", str(STEPS), "--global-batch-size", "8", "--micro-batch-size", "2",
            "--block-size", "32", "--seed", "1", "--save-every", "10", "--log-every", "1",
            "--warmup-steps", "3", "--lr", "3e-3", "--min-lr", "3e-4", "--num-workers", "0",
            "--wandb-mode", "disabled", *extra]


def run(args: list[str], tmp: Path, launcher: list[str] | None = None, check: bool = True):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + args
    proc = subprocess.run(cmd, env=env(tmp), capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    learnable_corpus(root / "a", 0)
    learnable_corpus(root / "b", 1)
    learnable_corpus(root / "val", 2, n_tokens=4000)
    return root


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory, tiny_tokenizer) -> Path:
    """30 steps on one process, with validation, a tokenizer and offline wandb."""
    out = tmp_path_factory.mktemp("straight")
    args = base_args(data, out, "--val-data", str(data / "val"), "--val-every", "10", "--val-batches", "2",
                     "--tokenizer", str(tiny_tokenizer))
    args[args.index("--wandb-mode") + 1] = "offline"
    run(args, out)
    return out


@pytest.mark.slow
def test_loss_goes_down_and_outputs_are_complete(straight, data):
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "peak_memory_gb", "data_wait_share",
                "tokens_seen", "skipped_steps"):
        assert key in train[0], key
    assert train[0]["mfu"] is None  # CPU: no peak FLOP/s, MFU n/a
    assert train[-1]["tokens_seen"] == STEPS * 8 * 32
    # Each source's epoch, from the samples read so far (pretrain/data.py).
    sampler = MixtureSampler([SourceSpec(data / "a", 0.7), SourceSpec(data / "b", 0.3)], 32, 1, 512)
    assert {k: train[-1][k] for k in ("epoch/0", "epoch/1")} == sampler.source_epochs(STEPS * 8)
    first, last = np.mean([r["loss"] for r in train[:5]]), np.mean([r["loss"] for r in train[-5:]])
    assert last < first - 1.0, (first, last)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]

    ckpts = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert ckpts == ["step-000010", "step-000020", "step-000030"]
    last_ckpt = straight / "checkpoints" / "step-000030"
    for name in ("COMPLETE", "meta.json", "config.json", "args.json", "tokenizer.model", "state/.metadata",
                 "rng/rank-00000.pt"):
        assert (last_ckpt / name).exists(), name
    assert json.loads((last_ckpt / "meta.json").read_text())["step"] == STEPS
    from model import Llama
    model = Llama.load(straight / "final")
    assert model.config.block_size == 32 and (straight / "final" / "tokenizer.model").is_file()
    assert list((straight / "wandb").glob("offline-run-*")), "wandb offline run missing"


@pytest.mark.slow
def test_exact_resume_ignoring_a_checkpoint_cut_off_mid_write(data, straight, tmp_path):
    out = tmp_path / "resumed"
    run(base_args(data, out, "--stop-after-steps", str(STEPS // 2)), tmp_path)
    ckpts = out / "checkpoints"
    assert (ckpts / "step-000015" / "COMPLETE").is_file()
    # Simulate crashes mid-write: a newer temporary dir and a newer step dir without the marker.
    for name in (".step-000020.tmp", "step-000025"):
        shutil.copytree(ckpts / "step-000015", ckpts / name)
        (ckpts / name / "COMPLETE").unlink()
        (ckpts / name / "state" / "__0_0.distcp").write_bytes(b"truncated")
    proc = run(base_args(data, out, "--resume", "auto"), tmp_path)
    assert "ignoring incomplete checkpoint" in proc.stdout and "step-000025" in proc.stdout
    assert "resumed from" in proc.stdout and "step-000015" in proc.stdout

    straight_losses, resumed_losses = losses(straight), losses(out)
    assert sorted(resumed_losses) == list(range(1, STEPS + 1))
    assert resumed_losses == straight_losses  # bit-identical per-step losses
    a, b = weights(straight / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_fsdp_match_one_process(data, straight, tmp_path):
    out = tmp_path / "fsdp2"
    fabric = fabric_run("--accelerator", "cpu", "--devices", 2)
    # Activation checkpointing recomputes the same maths, so it rides along in this run.
    proc = run(base_args(data, out, "--activation-checkpointing"), tmp_path, launcher=fabric)
    assert "2 rank(s) x 2 micro-batch(es)" in proc.stdout
    assert "rank 0 holds 79,008 of 158,016 parameter elements" in proc.stdout  # really sharded
    assert yaml.safe_load((out / "config.yaml").read_text())["resolved"]["activation_checkpointing"] == "2 of 2 blocks"
    state = out / "checkpoints" / "step-000030" / "state"
    assert (state / "__0_0.distcp").is_file() and (state / "__1_0.distcp").is_file()

    one, two = losses(straight), losses(out)
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
    a, b = weights(straight / "final"), weights(out / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)

    # The consolidation tool turns the 2-rank sharded checkpoint into the same weights as final/.
    subprocess.run([sys.executable, str(REPO / "pretrain" / "consolidate.py"), "--ckpt", str(out / "checkpoints" /
                    "step-000030"), "--out", str(tmp_path / "consolidated")], check=True, env=env(tmp_path))
    c = weights(tmp_path / "consolidated")
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(data, straight, tmp_path):
    """SIGTERM after step 3 (the run signals itself there: no timer decides the step). The stop
    flag rides in the next step's all-reduced statistics (no collective of its own), so every
    rank stops after step 4: a checkpoint of step 4, exit 0, and `--resume auto` continues to
    the same per-step losses and weights as the uninterrupted run."""
    out = tmp_path / "preempted"
    proc = run(base_args(data, out, "--debug-signal", "3:SIGTERM", "--save-every", "1000"), tmp_path)
    assert "received a stop signal" in proc.stdout
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-000004"] and (saved[0] / "COMPLETE").is_file()
    assert not (out / "final").exists() and sorted(losses(out)) == [1, 2, 3, 4]

    resumed = run(base_args(data, out, "--resume", "auto"), tmp_path)
    assert "at step 4" in resumed.stdout
    assert losses(out) == losses(straight)  # bit-identical per-step losses, steps 1..30
    a, b = weights(straight / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_then_stop_the_run(data, tmp_path):
    out = tmp_path / "nan"
    args = base_args(data, out, "--debug-nan-steps", "3,6,7,8", "--max-skipped-steps", "3")
    proc = run(args, tmp_path, check=False)
    assert proc.returncode != 0
    assert "non-finite for 3 steps in a row (steps 6..8" in proc.stderr
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1 and rows[5]["skipped_steps"] == 1
    assert rows[3]["loss"] == "nan"  # the only step of that log window was skipped
    assert np.isfinite(rows[4]["loss"]) and rows[7]["skipped_steps"] == 3 and 8 not in rows
    assert not (out / "final").exists()


def test_bad_input_gives_a_clear_error(data, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    write_shard(big / "shard-0000.bin", np.arange(100), vocab_size=1000, eos_id=2, num_docs=1)
    from pretrain import tinyllama

    proc = run_main(tinyllama.main, *base_args(data, tmp_path / "out", "--data", f"{big}:1"))
    assert proc.returncode == 2
    assert "shard-0000.bin" in proc.stderr and "--vocab-size 1000" in proc.stderr


def short_args(data: Path, out: Path, steps: int, *extra) -> list[str]:
    args = base_args(data, out, *extra)
    args[args.index("--max-steps") + 1] = str(steps)
    return args


def test_finite_loss_with_infinite_gradient_norm_is_skipped(data, tmp_path):
    out = tmp_path / "infgrad"
    run(short_args(data, out, 4, "--debug-inf-grad-steps", "2", "--no-save"), tmp_path)
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert rows[2]["grad_norm"] == "inf" and rows[2]["skipped_steps"] == 1
    assert rows[2]["loss"] == "nan"  # the loss was finite, but the only step of the window was skipped
    assert rows[4]["skipped_steps"] == 1 and np.isfinite(rows[4]["loss"]) and np.isfinite(rows[4]["grad_norm"])


@pytest.mark.slow
def test_keep_last_keeps_the_newest_checkpoints(data, tmp_path):
    out = tmp_path / "keep"
    run(short_args(data, out, 8, "--save-every", "2", "--keep-last", "2"), tmp_path)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    out_all = tmp_path / "keep-all"
    run(short_args(data, out_all, 6, "--save-every", "2", "--keep-last", "0"), tmp_path)
    assert sorted(p.name for p in (out_all / "checkpoints").iterdir()) == \
        ["step-000002", "step-000004", "step-000006"]


def test_resume_from_an_explicit_checkpoint_path(data, straight, tmp_path):
    out = tmp_path / "from-path"
    proc = run(base_args(data, out, "--resume", str(straight / "checkpoints" / "step-000020")), tmp_path)
    assert "resumed from" in proc.stdout and "at step 20" in proc.stdout
    resumed, original = losses(out), losses(straight)
    assert sorted(resumed) == list(range(21, STEPS + 1))
    assert all(resumed[s] == original[s] for s in resumed)  # the same steps, bit for bit


def test_data_root_mixture_picks_up_validation_and_lr_decay_steps_end_the_cosine(tmp_path):
    root = tmp_path / "root"
    for name, seed in (("slimpajama", 0), ("starcoder", 1)):
        learnable_corpus(root / name / "train", seed)
    learnable_corpus(root / "slimpajama" / "validation", 2, n_tokens=2_000)  # starcoder has none: skipped
    out = tmp_path / "out"
    args = short_args(root, out, 6, "--val-every", "3", "--val-batches", "1", "--lr-decay-steps", "4", "--no-save")
    i = args.index("--data")
    del args[i:i + 3]
    proc = run(args + ["--data-root", str(root)], tmp_path)
    assert "slimpajama/train (70%" in proc.stdout and "starcoder/train (30%" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # logged step k ran at lr_at(k - 1): 3 warm-up steps up to 3e-3, the cosine ends at 0-based step 4
    # (--lr-decay-steps; by default it would run to --max-steps), then --min-lr holds
    assert lr[1] == pytest.approx(1e-3) and lr[4] == pytest.approx(3e-3) and lr[5] == lr[6] == pytest.approx(3e-4)


def test_bf16_mixed_runs_on_cpu(data, tmp_path):
    out = tmp_path / "bf16"
    proc = run(short_args(data, out, 3, "--precision", "bf16-mixed", "--no-save"), tmp_path)
    assert "precision bf16-mixed" in proc.stdout
    loss = losses(out)
    assert sorted(loss) == [1, 2, 3] and all(np.isfinite(v) for v in loss.values())


@pytest.mark.slow
def test_sigusr1_on_one_rank_stops_every_rank_with_a_checkpoint(data, tmp_path):
    """`python script.py --devices 2` (Fabric starts rank 1 itself); only rank 1 gets SIGUSR1,
    after step 2; its flag reaches rank 0 in step 3's all-reduced statistics, and both ranks stop
    after step 3 with one checkpoint of both shards."""
    out = tmp_path / "usr1"
    proc = run(base_args(data, out, "--debug-signal", "2:SIGUSR1:1", "--save-every", "1000", "--devices", "2",
                         "--accelerator", "cpu"), tmp_path)
    assert "received a stop signal" in proc.stdout
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-000003"] and (saved[0] / "COMPLETE").is_file(), proc.stderr[-3000:]
    state = saved[0] / "state"
    assert (state / "__0_0.distcp").is_file() and (state / "__1_0.distcp").is_file()  # both ranks saved
    assert not (out / "final").exists()
