"""pretrain/consolidate.py: a training checkpoint (or a pretraining --out directory) becomes
the consolidated format with the weights in the --dtype asked for, values exactly the
checkpoint's rounded once to that dtype, and the tokenizer carried along."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_main
from model import Config, Llama
from pretrain.checkpoint import save_training_checkpoint

REPO = Path(__file__).resolve().parents[1]


class OneProcess:
    """The part of Lightning Fabric that save_training_checkpoint uses, for one process:
    `save` writes a torch.distributed.checkpoint directory as Fabric's FSDP2 strategy does
    ({"model": ..., "train_state": ...}, nested keys flattened by DCP)."""

    global_rank, world_size = 0, 1

    def barrier(self):
        pass

    def save(self, path, state):
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": state["model"].state_dict(), "train_state": state["train_state"]},
                     checkpoint_id=str(path), no_dist=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    """A pretraining --out directory with two checkpoints; returns (out, model of the newest)."""
    out = tmp_path_factory.mktemp("pretrain_out")
    config = Config.from_name("tiny")
    for step, seed in ((10, 0), (20, 1)):
        torch.manual_seed(seed)
        model = Llama(config, kernels="torch")
        save_training_checkpoint(OneProcess(), out / "checkpoints", step, model, None,
                                 {"step": step, "tokens_seen": step * 64, "next_sample_index": step},
                                 config, {"test": True}, tokenizer=tiny_tokenizer)
    return out, model


def consolidate(*args):
    return subprocess.run([sys.executable, str(REPO / "pretrain" / "consolidate.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_flag_casts_every_weight_once(trained, tmp_path, tiny_tokenizer, flag, dtype):
    out, model = trained
    result = consolidate("--ckpt", out / "checkpoints" / "step-000020", "--out", tmp_path / "c", "--dtype", flag)
    assert result.returncode == 0, result.stderr
    assert f", {flag}) from " in result.stdout
    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert weights[key].dtype == dtype, key
        assert torch.equal(weights[key], value.to(dtype)), key
    assert (tmp_path / "c" / "tokenizer.model").read_bytes() == tiny_tokenizer.read_bytes()
    assert Llama.load(tmp_path / "c", kernels="torch").lm_head.weight.dtype == dtype


def test_output_directory_resolves_to_newest_checkpoint_in_fp32_by_default(trained, tmp_path):
    out, model = trained
    result = consolidate("--ckpt", out, "--out", tmp_path / "c")
    assert result.returncode == 0, result.stderr
    assert "step-000020" in result.stdout and ", fp32) from " in result.stdout
    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(weights[k], v) and weights[k].dtype == torch.float32
               for k, v in model.state_dict().items())


def test_unknown_dtype_is_refused(trained, tmp_path):
    out, _ = trained
    from pretrain import consolidate as script

    result = run_main(script.main, "--ckpt", out, "--out", tmp_path / "c", "--dtype", "int8")
    assert result.returncode == 2
    assert "--dtype: invalid choice: 'int8'" in result.stderr
    assert not (tmp_path / "c").exists()
