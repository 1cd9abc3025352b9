"""--fp8 (issue 26, item 5): torchao's float8 training on the block linears, checked on CPU
with torchao's emulation (float8 casts, high-precision matmuls): the layers converted,
lm_head left alone, checkpoint keys unchanged (a run resumes with or without --fp8), the
losses close to the unconverted run's, and the refusals at start."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_module
from safetensors.torch import load_file

from model import Config, Llama
from pretrain import fp8

REPO = Path(__file__).resolve().parents[1]


def test_block_linears_are_converted_and_the_keys_stay():
    require_module("torchao")
    config = Config.from_name("tiny", block_size=32)
    model = Llama(config, kernels="torch")
    keys = {k: v.shape for k, v in model.state_dict().items()}
    assert fp8.convert_fp8(model, emulate=True, fsdp_all_gather=False) == 4 * config.n_layer
    for block in model.layers:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.gate_up, block.mlp.down):
            assert type(linear).__name__ == "Float8Linear"
    assert type(model.lm_head) is torch.nn.Linear  # stays in the fused linear + cross-entropy
    assert {k: v.shape for k, v in model.state_dict().items()} == keys


def test_fp8_is_refused_without_cuda_or_torchao(monkeypatch):
    require_module("torchao")
    assert "compute capability 8.9" in fp8.fp8_problem(torch.device("cpu"), emulate=False)
    assert fp8.fp8_problem(torch.device("cpu"), emulate=True) is None
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    assert "pip install -e '.[fp8]'" in fp8.fp8_problem(torch.device("cpu"), emulate=True)


@pytest.mark.slow
def test_fp8_run_is_close_to_the_unconverted_losses_and_resumes_without_fp8(tmp_path):
    require_module("torchao")
    sys.path.insert(0, str(REPO / "tests"))
    from test_engine_device_step import MAIN_LOSSES
    from test_pretrain_run import SCRIPT, base_args, env, learnable_corpus

    learnable_corpus(tmp_path / "a", 0)
    learnable_corpus(tmp_path / "b", 1)

    def run(out, *extra):
        args = base_args(tmp_path, out, *extra)
        args[args.index("--max-steps") + 1] = "20"
        proc = subprocess.run([sys.executable, str(SCRIPT)] + args, env=env(tmp_path), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    out = tmp_path / "fp8"
    proc = run(out, "--fp8", "--debug-fp8-emulate")
    assert "float8 training on 8 block linears" in proc.stdout  # 4 per block, 2 blocks
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows if "loss" in r]
    # measured: within 0.5% of the fp32 run at every step (float8 rounding of activations and weights)
    assert got == pytest.approx(MAIN_LOSSES, rel=0.02)
    assert got != pytest.approx(MAIN_LOSSES, rel=1e-4)  # the casts really ran
    # The --fp8 checkpoint of step 10 resumes without --fp8: same keys, same shapes.
    resumed = tmp_path / "resumed"
    proc = run(resumed, "--resume", str(out / "checkpoints" / "step-000010"))
    assert "resumed from" in proc.stdout and "at step 10" in proc.stdout
    assert set(load_file(str(out / "final" / "model.safetensors"))) == \
        set(load_file(str(resumed / "final" / "model.safetensors")))
