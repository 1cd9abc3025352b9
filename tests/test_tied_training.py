"""Tied embeddings are one parameter through training: the optimizer holds it once and it stays
shared; 1 and 2 FSDP2 processes (gloo) give the losses of a plain single-process loop; a
training checkpoint resumes exactly; the consolidated file holds it once; an HF tied directory
loads straight into the shards (pretrain/sharded_load.py) as the plain load gives it.
Multi-process runs are tests/tied_probe.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sharded_load import check_parity, probe, reference

from model import Llama

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "tied_probe.py"


def run_probe(case: str, out: Path, devices: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LT_CLI_USED", None)
    proc = subprocess.run([sys.executable, str(PROBE), case, str(out), "--devices", str(devices)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out / f"{case}.pt", weights_only=False)


def plain_reference_losses() -> list[float]:
    """The probe's 4 steps with no Fabric and no FSDP: Llama, init_weights(seed 0), AdamW, clip 1.0."""
    from tied_probe import CONFIG, GLOBAL_BATCH, LR, global_batch

    model = Llama(CONFIG, kernels="torch")
    model.init_weights(seed=0)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step in range(1, 5):
        rows = global_batch(step)
        loss = model(rows[:, :-1], targets=rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert GLOBAL_BATCH == rows.shape[0]
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tied")
    return {devices: {"train": run_probe("train", root / str(devices), devices),
                      "resume": run_probe("resume", root / str(devices), devices),
                      "dir": root / str(devices)}
            for devices in (1, 2)}


@pytest.mark.slow
def test_the_tie_is_one_parameter_the_optimizer_holds_once(runs):
    for devices in (1, 2):
        train = runs[devices]["train"]
        assert train["tied_at_start"] and train["tied_at_end"] and runs[devices]["resume"]["tied_after_load"]
        assert train["optimizer_tensors"] == train["model_tensors"] == 2 * 6 + 2  # embed (= lm_head), final norm, 6 per block
        weights = train["weights"]
        assert torch.equal(weights["lm_head.weight"], weights["embed.weight"])


@pytest.mark.slow
def test_one_and_two_processes_give_the_plain_loops_losses(runs):
    expected = plain_reference_losses()
    for devices in (1, 2):
        torch.testing.assert_close(runs[devices]["train"]["losses"], expected, rtol=0, atol=1e-5)
    assert expected[2] < expected[0] - 0.05  # it trains: step 3 sees step 1's rows again


@pytest.mark.slow
def test_a_tied_training_checkpoint_resumes_exactly(runs):
    for devices in (1, 2):
        train, resume = runs[devices]["train"], runs[devices]["resume"]
        assert resume["step"] == 2
        assert resume["losses"] == train["losses"][2:]
        for name, tensor in train["weights"].items():
            assert torch.equal(resume["weights"][name], tensor), name


@pytest.mark.slow
def test_the_consolidated_tied_model_holds_the_matrix_once(runs):
    from safetensors import safe_open

    directory = runs[2]["dir"] / "consolidated"
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "embed.weight" in f.keys()
    model = Llama.load(directory, kernels="torch")
    assert model.lm_head.weight is model.embed.weight
    for name, tensor in runs[2]["train"]["weights"].items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.slow
def test_a_tied_hf_directory_loads_straight_into_the_shards(tiny_hf_models, tmp_path):
    source = tiny_hf_models["llama3"]
    results = probe(tmp_path, "parity", source, "--devices", 2, "--sharding", "fsdp")
    expected = reference(source)
    # our named parameters: the tied matrix once, as embed.weight
    expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    check_parity(results, expected, 2)
    assert all(r["same_after_step"] for r in results)


def test_the_tie_survives_a_meta_build_materialised_and_cast():
    from tied_probe import CONFIG

    with torch.device("meta"):
        model = Llama(CONFIG, kernels="torch")
    model.to_empty(device="cpu")  # each module would get a Parameter of its own
    assert model.lm_head.weight is model.embed.weight
    model = model.to(torch.bfloat16)
    assert model.lm_head.weight is model.embed.weight
    assert len(list(model.parameters())) == 2 * 6 + 2


def test_a_tied_config_refuses_an_lm_head_that_differs():
    from tied_probe import CONFIG

    state = Llama(CONFIG, kernels="torch").state_dict()
    state = {**state, "lm_head.weight": state["embed.weight"] + 1}
    with pytest.raises(ValueError, match="ties the embeddings .*lm_head.weight differs from embed.weight"):
        Llama.from_state_dict(CONFIG, state, source="weights.safetensors")


def test_the_sharded_load_refuses_a_tied_checkpoint_whose_lm_head_differs(tiny_hf_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from pretrain.sharded_load import _fill_from_hf, read_model_config

    directory = tmp_path / "both"
    shutil.copytree(tiny_hf_models["llama3"], directory)
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = read_model_config(directory)
    with pytest.raises(ValueError, match="tie_word_embeddings is true but the weights hold an lm_head.weight"):
        _fill_from_hf(Llama(config, kernels="torch"), directory, config)
