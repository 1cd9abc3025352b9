"""The start checkpoint of SFT/SPIN loaded straight into the sharded model (pretrain/sharded_load.py).

Multi-process checks run tests/sharded_load_probe.py on gloo processes, which loads the same
checkpoint the old way (the whole model on every rank, then sharded) and the new way and
compares; the memory check measures each rank's peak resident memory during the load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main
from test_finetune_ckpt_sources import pretrain_out  # noqa: F401  (fixture)
from test_spin_e2e import chat_file, run_cli  # noqa: F401  (fixture)

from model import Config, Llama
from model.hf import save_hf, save_hf_tokenizer
from model.tensor_file import TensorFile

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "sharded_load_probe.py"


def probe(tmp_path: Path, case: str, ckpt: Path, *flags) -> list[dict]:
    """Every rank's result of the probe."""
    prefix = tmp_path / f"{case}-{abs(hash((str(ckpt), flags)))}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LT_CLI_USED", None)
    proc = subprocess.run([sys.executable, str(PROBE), case, str(ckpt), str(prefix), *map(str, flags)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = sorted(prefix.parent.glob(f"{prefix.name}.rank*.pt"))
    return [torch.load(path, weights_only=False) for path in results]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One random model in our format, as an HF export (fp32) and as a bf16 HF export. Its vocab
    (515 rows) does not split evenly over 2 ranks, so the last shard is the shorter one."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny", vocab_size=515), kernels="torch")
    model.save(root / "ours")
    save_hf(model, root / "hf")
    save_hf(model, root / "hf-bf16", dtype=torch.bfloat16)
    return {"ours": root / "ours", "hf": root / "hf", "hf-bf16": root / "hf-bf16"}


def reference(path: Path) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import load_model_from_any

    return {k: v.float() for k, v in load_model_from_any(path, kernels="torch").state_dict().items()}


def check_parity(results: list[dict], expected: dict[str, torch.Tensor], world: int) -> None:
    assert len(results) == world and all(r["world_size"] == world for r in results)
    for rank, r in enumerate(results):
        assert r["names"], "the two loads have different parameters"
        assert not [n for n, same in r["same"].items() if not same], f"rank {rank}: shards differ"
        assert r["same_placements"]
        assert set(r["dtypes"].values()) == {torch.float32}  # fp32 master weights whatever the file holds
        assert r["new_loss"] == r["old_loss"]
    full = results[0]["full"]
    assert sorted(full) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(full[name], tensor), name


# ---- parity with the old full load, on 1 and 2 gloo processes -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source, devices, flags", [
    ("ours", 2, ("--sharding", "fsdp")),
    ("ours", 1, ()),
    ("hf", 2, ("--sharding", "hsdp", "--precision", "bf16-mixed")),
    ("hf", 2, ("--sharding", "ddp")),
])
def test_the_sharded_load_gives_the_old_loads_shards(sources, tmp_path, source, devices, flags):
    results = probe(tmp_path, "parity", sources[source], "--devices", devices, *flags)
    check_parity(results, reference(sources[source]), devices)
    for r in results:
        assert r["same_after_step"]  # one identical SGD step: the same loss and updated shards
    if devices == 2 and "ddp" not in flags:  # the shards split the model between the ranks
        assert sum(r["local_numel"] for r in results) == sum(t.numel() for t in reference(sources[source]).values())


@pytest.mark.slow
def test_a_bf16_hf_export_is_read_into_fp32_master_weights(sources, tmp_path):
    # The old load kept the file's bf16 as the parameters' dtype; the values are the same.
    results = probe(tmp_path, "parity", sources["hf-bf16"], "--devices", 2, "--sharding", "fsdp")
    expected = reference(sources["hf-bf16"])
    assert all(t.dtype == torch.float32 for t in expected.values())
    check_parity(results, expected, 2)
    assert set(results[0]["old_dtypes"].values()) == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.parametrize("devices, flags", [(2, ("--sharding", "fsdp", "--precision", "bf16-mixed")),
                                            (1, ("--sharding", "hsdp"))])
def test_a_training_checkpoint_is_read_shard_by_shard(pretrain_out, tmp_path, devices, flags):  # noqa: F811
    ckpt = pretrain_out / "checkpoints" / "step-000002"
    results = probe(tmp_path, "parity", ckpt, "--devices", devices, *flags)
    check_parity(results, reference(ckpt), devices)
    assert all(r["same_after_step"] for r in results)


# ---- memory ---------------------------------------------------------------------------------------
MEMORY_CONFIG = Config(name="custom", vocab_size=2048, n_layer=12, n_embd=512, n_head=8, n_kv_head=2,
                       intermediate_size=1536, block_size=64)  # 153 MB of fp32 weights, no tensor over 6.3 MB


@pytest.mark.slow
def test_each_rank_holds_about_its_shards_while_loading(tmp_path):
    """Peak resident memory added by the load on each of 2 ranks: about half the model new
    (its shards + one parameter at a time), more than the whole model the old way."""
    with torch.device("meta"):
        model = Llama(MEMORY_CONFIG, kernels="torch")
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model.save(tmp_path / "ckpt")
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    limit = 0.75 * full  # shards are 0.5; the old load's peak is above 1.0
    new = probe(tmp_path, "memory", tmp_path / "ckpt", "--devices", 2, "--sharding", "fsdp")
    old = probe(tmp_path, "memory", tmp_path / "ckpt", "--devices", 2, "--sharding", "fsdp", "--old")
    for r in new + old:
        assert r["local_bytes"] == full // 2
    # Measured from the peak before the load, not the resident size then: pages of the shared
    # libraries that a busy machine evicted earlier and the load faults back in are not the load's.
    for rank, r in enumerate(new):
        added = r["peak"] - r["peak_before"]
        assert added < limit, f"rank {rank}: +{added / 1e6:.0f} MB"
    for rank, r in enumerate(old):  # the measurement sees a full copy when there is one
        added = r["peak"] - r["peak_before"]
        assert added > limit, f"rank {rank}: +{added / 1e6:.0f} MB"


# ---- the reader and its errors --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_tensor_file_reads_rows_as_safetensors_stores_them(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(7, 3, 2, generator=g) * 5).to(dtype), "scalar": torch.tensor(3.5).to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    stored, f = load_file(str(tmp_path / "t.safetensors")), TensorFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    assert f.shape("a") == (7, 3, 2) and f.dtype("a") == dtype
    assert torch.equal(f.read("a"), stored["a"])
    for start, stop in [(0, 4), (4, 7), (7, 7), (2, 3)]:
        assert torch.equal(f.read("a", start, stop), stored["a"][start:stop])
    assert torch.equal(f.read("scalar"), stored["scalar"])
    assert f.read("empty").shape == (0, 4)
    with pytest.raises(IndexError, match="rows 5:9 of a"):
        f.read("a", 5, 9)


@pytest.fixture()
def broken(tmp_path, tiny_tokenizer):
    """A consolidated checkpoint (with tokenizer) to break in different ways."""
    import shutil

    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny"), kernels="torch")
    model.save(tmp_path / "ckpt")
    shutil.copyfile(tiny_tokenizer, tmp_path / "ckpt" / "tokenizer.model")
    return tmp_path / "ckpt"


def sft_error(ckpt: Path, chat_file: Path, tmp_path: Path) -> str:  # noqa: F811
    from finetune import sft

    r = run_main(sft.main, "--ckpt", ckpt, "--data", chat_file, "--out", tmp_path / "out", "--max-steps", 1,
                 "--global-batch-size", 4, "--micro-batch-size", 4)
    assert r.returncode == 2, r.stderr[-3000:]
    assert not (tmp_path / "out" / "final").exists()
    return r.stderr


def test_a_checkpoint_cut_off_is_named(broken, chat_file, tmp_path):  # noqa: F811
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = sft_error(broken, chat_file, tmp_path)
    assert f"{weights}: " in err and "is cut off (read" in err


def test_weights_for_another_config_are_named(broken, chat_file, tmp_path):  # noqa: F811
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"n_layer": 3}))
    err = sft_error(broken, chat_file, tmp_path)
    assert f"{broken / 'model.safetensors'}: weights do not match config" in err and "layers.2." in err
    (broken / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    err = sft_error(broken, chat_file, tmp_path)
    assert f"{broken / 'model.safetensors'}: layers.0.mlp.gate_up.weight has shape" in err


def test_an_hf_directory_without_weights_or_a_tensor_is_named(tmp_path, chat_file, tiny_tokenizer):  # noqa: F811
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    save_hf(Llama(Config.from_name("tiny"), kernels="torch"), hf)
    save_hf_tokenizer(tiny_tokenizer, hf)
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"))
    err = sft_error(hf, chat_file, tmp_path)
    assert f"{hf}: missing tensor 'model.layers.1.mlp.up_proj.weight'" in err
    (hf / "model.safetensors").unlink()
    err = sft_error(hf, chat_file, tmp_path)
    assert f"{hf}: no model.safetensors, pytorch_model.bin or their index files" in err


# ---- SFT and SPIN on 2 gloo processes -------------------------------------------------------------
def metric_rows(out: Path, key: str) -> list[dict]:
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in row]


def finetune(script: str, out: Path, devices: int, *args):
    launch = () if devices == 1 else ("--accelerator", "cpu", "--devices", devices, "--sharding", "fsdp")
    r = run_cli(script, *args, "--out", out, *launch)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"over {devices} rank(s)" in r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_sft_from_an_hf_directory_on_two_processes_matches_one(tiny_checkpoints, chat_file, tmp_path):  # noqa: F811
    args = ("--ckpt", tiny_checkpoints["hf"], "--data", chat_file, "--max-steps", 2, "--global-batch-size", 4,
            "--micro-batch-size", 2, "--lr", 1e-3)
    one, two = (finetune("sft.py", tmp_path / f"sft{n}", n, *args) for n in (1, 2))
    assert metric_rows(two, "loss")[0]["loss"] == pytest.approx(metric_rows(one, "loss")[0]["loss"], abs=1e-6)
    a, b = (Llama.load(out / "final", kernels="torch").state_dict() for out in (one, two))
    assert all(b[k].dtype == torch.float32 and torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_spin_from_a_training_checkpoint_on_two_processes_matches_one(pretrain_out, chat_file, tmp_path):  # noqa: F811
    """Two optimizer steps of 4 pairs each: the first step's loss is log 2 on any data (policy ==
    reference), so only the second step's loss and the trained weights show that each rank
    trained on its own half of the global batch (ranks that all took rank 0's micro-batches
    would see half the pairs, and differ from the one-process run)."""
    args = ("--ckpt", pretrain_out / "checkpoints" / "step-000002", "--data", chat_file, "--iterations", 1,
            "--num-prompts", 8, "--max-new-tokens", 8, "--max-prompt-len", 32, "--max-len", 64, "--temperature", 0,
            "--global-batch-size", 4, "--micro-batch-size", 1, "--epochs", 1, "--lr", 1e-3, "--no-progress")
    one, two = (finetune("spin.py", tmp_path / f"spin{n}", n, *args) for n in (1, 2))
    rows = [metric_rows(out, "loss") for out in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 2
    assert rows[0][1]["loss"] != pytest.approx(rows[0][0]["loss"], abs=1e-4)  # the second step saw trained weights
    for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
        assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], abs=1e-5), key
    a, b = (Llama.load(out / "iter1", kernels="torch").state_dict() for out in (one, two))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
