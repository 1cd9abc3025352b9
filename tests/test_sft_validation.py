"""finetune/sft.py --val-data and --save-every-epoch: the held-out loss logged per epoch is the
loss of the model saved at that epoch, the same on one process and on two, and each epoch
but the last is kept as SFT_DIR/epoch{k}."""
import json

import pytest
import torch

from finetune.chat import ChatEncoder, ChatTemplate, read_chat
from finetune.sft import collate, n_targets, tokenize_rows
from data_prep.tokenizer import load_tokenizer
from model import Llama
from test_finetune_cli_errors import chat, ckpts, refused, run, write_chat  # noqa: F401  (the same tiny fixtures)


def val_rows(metrics_file):
    return [r for r in map(json.loads, metrics_file.read_text().splitlines()) if "val_loss" in r]


def mean_answer_loss(ckpt, data) -> float:
    """The reference: each row alone through the saved model, loss weighted by its answer tokens."""
    tok = load_tokenizer(ckpt)
    model = Llama.load(ckpt, kernels="torch").eval()
    rows = tokenize_rows(read_chat(data), ChatEncoder(tok, ChatTemplate.load(ckpt)), model.config.block_size)
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            ids, labels = collate([row], tok.pad_id, "cpu")
            total += float(model(ids, targets=labels)) * n_targets(row)
            count += n_targets(row)
    return total / count


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """5 rows: with micro-batches of 2 on 2 ranks, the last round gives rank 1 no row."""
    return write_chat(tmp_path_factory.mktemp("val") / "val.jsonl",
                      [(f"name {100 + i}", f"it is {100 + i}, twice {i}") for i in range(5)])


SFT = ["--epochs", 2, "--global-batch-size", 8, "--micro-batch-size", 2, "--lr", 1e-3, "--kernels", "torch",
       "--save-every-epoch"]


def test_val_loss_per_epoch_is_the_saved_models_loss(ckpts, chat, held_out, tmp_path):
    out = tmp_path / "sft"
    result = run("sft.py", "--ckpt", ckpts["ok"], "--data", chat, "--val-data", held_out, "--out", out, *SFT)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = val_rows(out / "metrics.jsonl")
    assert [(r["step"], r["epochs_done"]) for r in logged] == [(0, 0), (3, 1), (6, 2)]  # 24 rows / 8 per step
    assert (out / "epoch1" / "model.safetensors").is_file()
    assert not (out / "epoch2").exists()          # the last epoch is final/
    for r, ckpt in zip(logged, (ckpts["ok"], out / "epoch1", out / "final")):
        assert r["val_loss"] == pytest.approx(mean_answer_loss(ckpt, held_out), rel=1e-5)
    assert logged[2]["val_loss"] < logged[0]["val_loss"]


@pytest.mark.slow
def test_val_loss_is_the_same_on_two_processes(ckpts, chat, held_out, tmp_path):
    outs = {}
    for devices in (1, 2):
        outs[devices] = tmp_path / f"d{devices}"
        extra = ["--accelerator", "cpu", "--devices", devices]
        result = run("sft.py", "--ckpt", ckpts["ok"], "--data", chat, "--val-data", held_out,
                     "--out", outs[devices], *SFT, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (val_rows(outs[d] / "metrics.jsonl") for d in (1, 2))
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_a_missing_val_file_is_refused(ckpts, chat, tmp_path):
    result = refused("sft.py", "--ckpt", ckpts["ok"], "--data", chat, "--val-data", tmp_path / "nope.jsonl",
                 "--out", tmp_path / "sft", *SFT)
    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr
