"""Checkpoints written before Config had tie_embeddings, head_dim, rope_type, sliding_window and
architecture still work: a pretraining run saved with the old config layout resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shards import write_shard

REPO = Path(__file__).resolve().parents[1]
OLD_FIELDS = ("name", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "block_size",
              "norm_eps", "rope_base")


def pretrain(root: Path, steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "pretrain" / "tinyllama.py"), "--config", "tiny", "--data", f"{root}:1",
           "--out", str(root / "out"), "--max-steps", str(steps), "--global-batch-size", "2",
           "--micro-batch-size", "2", "--num-workers", "0", "--wandb-mode", "disabled", "--save-every", "2",
           "--resume", "auto"]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)


@pytest.mark.slow
def test_a_training_checkpoint_with_the_old_config_layout_resumes(tmp_path):
    write_shard(tmp_path / "a_00000.bin", np.random.default_rng(0).integers(3, 512, 20_000), vocab_size=512,
                eos_id=2, num_docs=1)
    assert pretrain(tmp_path, 2).returncode == 0
    step = tmp_path / "out" / "checkpoints" / "step-000002"
    # rewrite the saved config as the code before these fields wrote it
    meta = torch.load(step / "state" / "meta.pt", weights_only=False)
    meta["train_state"]["config"] = {k: meta["train_state"]["config"][k] for k in OLD_FIELDS}
    torch.save(meta, step / "state" / "meta.pt")
    config = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({k: config[k] for k in OLD_FIELDS}))
    result = pretrain(tmp_path, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
