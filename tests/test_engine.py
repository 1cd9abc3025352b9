"""The training engine (pretrain/engine.py) and the defects of issue 15, each checked on CPU.

Multi-process checks run tests/engine_probe.py on 2 gloo processes; the references are
computed here on one process without any sharding.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from model import Config, Llama

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "engine_probe.py"
FABRIC = str(Path(sys.executable).parent / "fabric")


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    e.pop("LT_CLI_USED", None)
    return e


def probe(tmp_path: Path, case: str, *flags) -> dict:
    result = tmp_path / f"{case}-{abs(hash(flags))}.pt"
    proc = subprocess.run([sys.executable, str(PROBE), case, str(result), *map(str, flags)], env=env(),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(result, weights_only=False)


def probe_reference(*, seed: int = 0) -> Llama:
    """The probe's tiny model on one process, unsharded, with the engine's seeded init."""
    sys.path.insert(0, str(REPO / "tests"))
    from engine_probe import CONFIG

    model = Llama(CONFIG, kernels="torch")
    model.init_weights(seed=seed)
    return model


# ---- 2. gradient accumulation without per-micro-batch sync ------------------------------------
@pytest.mark.slow
def test_accumulation_reduce_scatters_once_per_step_with_the_same_losses(tmp_path):
    synced = probe(tmp_path, "accumulation", "--devices", 2, "--micro-batch-size", 1, "--sync-every-micro-batch")
    two = probe(tmp_path, "accumulation", "--devices", 2, "--micro-batch-size", 2)
    four = probe(tmp_path, "accumulation", "--devices", 2, "--micro-batch-size", 1)
    # 2 blocks + the root are FSDP units: 3 reduce-scatters per step, whatever the accumulation.
    assert two["reduce_scatters_per_step"] == four["reduce_scatters_per_step"] == [3, 3, 3]
    assert synced["reduce_scatters_per_step"] == [12, 12, 12]  # the old loop: 4 micro-batches x 3
    for a, b in zip(synced["losses"], four["losses"]):
        assert abs(a - b) < 1e-5, (synced["losses"], four["losses"])
    for a, b in zip(two["losses"], four["losses"]):
        assert abs(a - b) < 1e-5
    for k, w in synced["weights"].items():  # AdamW magnifies summation-order differences a little
        torch.testing.assert_close(four["weights"][k], w, atol=1e-4, rtol=0)


# ---- 3. the clipped gradient norm over DTensors --------------------------------------------
@pytest.mark.slow
def test_clip_norm_over_shards_equals_single_process_reference(tmp_path):
    max_norm = 0.5
    sharded = probe(tmp_path, "clip", "--devices", 2, "--max-norm", max_norm)
    sys.path.insert(0, str(REPO / "tests"))
    from engine_probe import global_batch

    model = probe_reference()
    rows = global_batch(0)
    model(rows[:, :-1], targets=rows[:, 1:]).backward()
    reference = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    assert abs(float(sharded["norm"]) - float(reference)) < 1e-6, (float(sharded["norm"]), float(reference))
    assert float(reference) > max_norm  # so the clipping really scaled the gradients
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], p.grad, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_clip_norm_with_sharded_and_plain_gradients_mixed(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from engine_probe import mixed_input, mixed_model

    sharded = probe(tmp_path, "clip_mixed", "--devices", 2, "--max-norm", 0.5)
    model = mixed_model()
    model(mixed_input()).square().sum().backward()
    reference = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert abs(float(sharded["norm"]) - float(reference)) < 1e-6 * float(reference), \
        (float(sharded["norm"]), float(reference))


def test_clip_norm_of_plain_gradients():
    """One process, no process group: plain gradients alone give the plain norm and are clipped."""
    from pretrain.parallel import clip_grad_norm

    model = torch.nn.Linear(4, 3)
    model.weight.grad = torch.full((3, 4), 2.0)
    model.bias.grad = torch.full((3,), 1.0)
    norm = clip_grad_norm(model, 1.0)
    assert abs(float(norm) - (12 * 4 + 3) ** 0.5) < 1e-6
    total = torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm()
    assert abs(float(total) - 1.0) < 1e-5


# ---- 5. --seed reaches the weights of a meta-device build ---------------------------------
@pytest.mark.slow
def test_seed_gives_the_same_weights_on_one_and_two_processes(tmp_path):
    one = probe(tmp_path, "init", "--devices", 1, "--seed", 7)["weights"]
    two = probe(tmp_path, "init", "--devices", 2, "--seed", 7)["weights"]
    other = probe(tmp_path, "init", "--devices", 2, "--seed", 8)["weights"]
    assert set(one) == set(two)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(one[k], probe_reference(seed=7).state_dict()[k]) for k in one)
    matrices = [k for k in one if one[k].ndim == 2]
    assert all(not torch.equal(two[k], other[k]) for k in matrices)


# ---- 6. RoPE tables stay fp32 under a bf16 MixedPrecisionPolicy ---------------------------
def test_rope_tables_reach_apply_rope_in_fp32_under_bf16_policy(tmp_path):
    seen = probe(tmp_path, "rope", "--devices", 1, "--precision", "bf16-mixed")["seen"]
    assert len(seen) == 2  # one per block
    assert all(q == "torch.bfloat16" and cos == sin == "torch.float32" for q, cos, sin in seen), seen


# ---- 4. no host sync per micro-batch --------------------------------------------------------
class _FakeFabric:
    """Enough of Fabric for Engine on one process without a process group."""

    device = torch.device("cpu")
    world_size = 1

    def backward(self, loss):
        loss.backward()

    def all_reduce(self, t, reduce_op="sum"):
        return t

    def print(self, *a):
        print(*a)


def test_engine_reads_the_device_once_per_step_one_step_late(monkeypatch):
    from finetune.losses import spin_loss
    from pretrain.engine import Engine

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    engine = Engine(_FakeFabric(), model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), grad_clip=1.0)
    ref = torch.zeros(2)

    def loss_fn(x):
        out = model(x).squeeze(-1)
        loss, metrics = spin_loss(out, -out, ref, ref, beta=0.1)
        return loss / 4, metrics

    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n),
                                                                                               _o(self, *a, **k))[1])
    first = engine.step([torch.randn(2, 8) for _ in range(4)], loss_fn, lr=0.1, step_number=1)
    assert reads == [], reads  # the first step waits for nothing
    engine.step([torch.randn(2, 8) for _ in range(4)], loss_fn, lr=0.1, step_number=2)
    monkeypatch.undo()
    assert reads == ["tolist"], reads  # one copy of step 1's sums and norm, read during step 2
    assert set(first.sums) >= {"loss", "rewards/accuracies"} and not first.skipped


def test_spin_loss_metrics_stay_on_the_device():
    from finetune.losses import spin_loss

    _, metrics = spin_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1), 0.1)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())


# ---- 7. fused linear + CE under torch.no_grad --------------------------------------------
def test_fused_linear_cross_entropy_computes_no_gradient_under_no_grad(monkeypatch):
    flce = sys.modules["kernels.fused_linear_cross_entropy"]  # the package attribute is the function
    calls = []
    original = flce.ce_grad_rows
    monkeypatch.setattr(flce, "ce_grad_rows", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(32, 16, requires_grad=True)
    targets = torch.randint(0, 32, (8,))
    expected = kernels.fused_linear_cross_entropy_reference(hidden, weight, targets)
    with torch.no_grad():
        loss = kernels.fused_linear_cross_entropy(hidden, weight, targets)
    assert calls == [] and not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5)
    kernels.fused_linear_cross_entropy(hidden, weight, targets).backward()
    assert calls and hidden.grad is not None and weight.grad is not None


# ---- 8. a broken flash-attn wheel ---------------------------------------------------------
def test_broken_flash_attn_falls_back_to_sdpa_with_one_warning(tmp_path):
    fake = tmp_path / "site" / "flash_attn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import torch, model, model.attention as a\n"
            "print(a.attention_backend('cuda', torch.bfloat16))\n")
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("sdpa (flash-attn is installed but failed to import (ImportError")
    assert proc.stderr.count("flash-attn is installed but failed to import") == 1, proc.stderr


# ---- 9. no silent fallbacks: kernels and the run description -----------------------------
def test_auto_kernels_on_cuda_without_triton_is_an_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="--kernels torch"):
        kernels.resolve_backend("auto", "cuda")
    assert kernels.resolve_backend("torch", "cuda") == "torch"  # asked for: allowed
    assert kernels.resolve_backend("auto", "cpu") == "torch"


def test_setup_requires_the_torch_with_public_fully_shard():
    text = (REPO / "setup.py").read_text()
    assert '"torch>=2.6,<3"' in text
    from torch.distributed.fsdp import fully_shard  # public since 2.6

    assert callable(fully_shard)


# ---- 10. activation checkpointing, --compile -----------------------------------------------
@pytest.mark.slow
def test_activation_checkpointing_recomputes_every_block_in_backward(tmp_path):
    """setup_fabric(activation_checkpointing=True) on 2 ranks: each block's MLP runs once in the
    forward and once more in backward (its recomputation), and the gradients are those of the
    plain model here, on one process, where the MLP runs once."""
    sharded = probe(tmp_path, "recompute", "--devices", 2, "--activation-checkpointing")
    assert sharded["after_forward"] == [1, 1] and sharded["after_backward"] == [2, 2]
    model = probe_reference()
    from engine_probe import global_batch

    rows = global_batch(0)[:2]
    loss = model(rows[:, :-1], targets=rows[:, 1:])
    loss.backward()
    assert sharded["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_does_not_save_rng_state(monkeypatch):
    # Nothing in a block is random, so the recomputation need not restore the RNG around it.
    import pretrain.parallel as parallel

    seen = {}
    monkeypatch.setattr(parallel, "checkpoint", lambda fn, *a, **k: (seen.update(k), fn(*a))[1])
    parallel._checkpointed_forward(lambda x: x + 1, torch.ones(1))
    assert seen["preserve_rng_state"] is False and seen["use_reentrant"] is False


# ---- 11. tokens/s leaves validation and checkpoint time out --------------------------------
def test_throughput_excludes_paused_time():
    from pretrain.engine import Throughput

    now = [100.0]
    meter = Throughput("cpu", clock=lambda: now[0])
    now[0] += 2.0
    meter.add(tokens=4000, sequences=2)
    with meter.paused():  # a validation
        now[0] += 30.0
    now[0] += 2.0
    meter.add(tokens=4000, sequences=2)
    with meter.paused():  # a checkpoint save
        now[0] += 50.0
    rate = meter.read()
    assert rate["tokens_per_sec"] == pytest.approx(8000 / 4.0)
    assert rate["mean_seq_len"] == 2000
    now[0] += 1.0
    meter.add(tokens=1000, sequences=1)
    assert meter.read()["tokens_per_sec"] == pytest.approx(1000.0)  # a new window


# ---- 12. MFU in both conventions -----------------------------------------------------------
def test_mfu_names_both_conventions():
    from pretrain.engine import MFU_CONVENTION, mfu_metrics

    config = Config.from_name("tinyllama-1.1b")
    m = mfu_metrics(config, 2048, tokens_per_sec=24_000, world_size=1, peak_flops=312e12)
    assert m["mfu"] == pytest.approx(config.flops_per_token(2048) * 24_000 / 312e12)
    assert m["mfu_6n"] == pytest.approx(6 * 1_100_048_384 * 24_000 / 312e12)  # TinyLlama's ~51% at 24k tok/s
    assert m["mfu"] > m["mfu_6n"]  # attention FLOPs outweigh the embedding lookup
    assert "6·N_non-embedding" in MFU_CONVENTION and "6·N_total" in MFU_CONVENTION
    assert mfu_metrics(config, 2048, 1.0, 1, None) == {"mfu": None, "mfu_6n": None}


# ---- one schedule for all three stages ------------------------------------------------------
def test_one_schedule_covers_pretraining_and_finetuning():
    from pretrain.schedule import lr_at, warmup_steps_from_ratio

    warmup = warmup_steps_from_ratio(0.1, 100)
    assert warmup == 10
    assert lr_at(0, 1.0, 0.0, warmup, 100, "linear") == pytest.approx(0.1)  # first step not wasted
    assert lr_at(9, 1.0, 0.0, warmup, 100, "linear") == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.0, warmup, 100, "linear") == pytest.approx(0.5)
    assert lr_at(55, 1.0, 0.2, warmup, 100, "cosine") == pytest.approx(0.6)
    assert lr_at(150, 1.0, 0.2, warmup, 100, "cosine") == pytest.approx(0.2)
    assert lr_at(150, 1.0, 0.2, warmup, 100, "constant") == 1.0
    with pytest.raises(ValueError, match="--lr-schedule"):
        lr_at(0, 1.0, 0.0, 0, 10, "step")


def test_reduce_dtype_option():
    from pretrain.parallel import precision_dtypes

    assert precision_dtypes("bf16-mixed") == (torch.bfloat16, torch.float32)  # fp32 reduction by default
    assert precision_dtypes("bf16-mixed", "bf16") == (torch.bfloat16, torch.bfloat16)  # TinyLlama's
    assert precision_dtypes("32-true", "bf16") == (torch.float32, torch.float32)
    with pytest.raises(ValueError, match="--reduce-dtype"):
        precision_dtypes("bf16-mixed", "fp16")
