"""`--profile-step N` profiles exactly that step: the op table is printed and a trace written;
a step number below 1 is refused with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_main
from data_prep.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(data / "a_00000.bin", rng.integers(3, 512, 20_000), vocab_size=512, eos_id=2, num_docs=1)
    cmd = [sys.executable, str(ROOT / "pretrain" / "tinyllama.py"), "--config", "tiny", "--data", f"{data}:1",
           "--out", str(tmp_path / "out"), "--max-steps", "3", "--global-batch-size", "2", "--micro-batch-size", "2",
           "--num-workers", "0", "--wandb-mode", "disabled", "--no-save", "--log-every", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_profile_step_prints_table_and_writes_trace(tmp_path):
    proc = _run(tmp_path, "--profile-step", "2")
    assert proc.returncode == 0, proc.stderr
    assert "profile of step 2" in proc.stdout + proc.stderr
    assert "Self CPU" in proc.stdout + proc.stderr  # the profiler's op table
    trace = json.loads((tmp_path / "out" / "profile" / "step-rank0.json").read_text())
    assert trace["traceEvents"]
    # --no-save: no checkpoint and no final model, only the metrics and the profile
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "metrics.jsonl", "profile"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_profile_step_must_be_positive(tmp_path):
    from pretrain import tinyllama

    proc = run_main(tinyllama.main, "--config", "tiny", "--data", f"{tmp_path}:1", "--out", tmp_path / "out",
                    "--profile-step", "0")
    assert proc.returncode == 2
    assert "--profile-step must be positive, got 0" in proc.stderr
