"""Engine.step keeps host work off the critical path (issue 26, item 1): clipping and the
non-finite skip decided on the device through fused AdamW's grad_scale/found_inf, the step's
statistics read one step late, the stop flag inside the one all-reduced vector. Each test
here fails with the bug it is named after planted (a host read in the step, a skipped step
that still moves the moments or the step count, a clip factor off by the 1e-6, a separate
collective for the flag, losses that drift from what main produced)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.engine import Engine, TrainingError

REPO = Path(__file__).resolve().parents[1]


class FakeFabric:
    """Enough of Fabric for Engine on one process without a process group; counts all-reduces."""

    device = torch.device("cpu")
    world_size = 1

    def __init__(self):
        self.all_reduces: list[torch.Tensor] = []

    def backward(self, loss):
        loss.backward()

    def all_reduce(self, t, reduce_op="sum"):
        self.all_reduces.append(t.clone())
        return t

    def print(self, *a):
        print(*a)


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=g) * 3 for _ in range(n)]


def loss_fn_for(model, scale: float = 1.0):
    def loss_fn(x):
        loss = model(x).square().mean() * scale
        return loss / 2, {"loss": loss.detach()}
    return loss_fn


def fused_adamw(model, eps: float = 1e-8):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=eps, fused=True)


def test_a_non_finite_gradient_leaves_parameters_moments_and_step_count_unchanged():
    model = tiny_net()
    optimizer = fused_adamw(model)
    engine = Engine(FakeFabric(), model, optimizer, grad_clip=1.0)
    assert engine.on_device
    engine.step(batches(2), loss_fn_for(model), lr=1e-2, step_number=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = copy.deepcopy(optimizer.state_dict()["state"])
    # A finite loss (~1e31) whose squared gradients overflow: the norm is inf, the loss is not.
    bad = engine.step(batches(2, seed=2), loss_fn_for(model, scale=1e30), lr=1e-2, step_number=2)
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    after = optimizer.state_dict()["state"]
    for i, s in state.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after[i][key], s[key]), (i, key)
    assert bad.skipped and bad.grad_norm == float("inf") and bad.sums["loss"] < float("inf")
    engine.settle()
    assert engine.skipped_steps == 1
    good = engine.step(batches(2, seed=3), loss_fn_for(model), lr=1e-2, step_number=3)
    assert not good.skipped and float(optimizer.state_dict()["state"][0]["step"]) == 2.0


def test_clipping_on_the_device_equals_clip_grad_norm():
    max_norm = 0.3
    model, reference = tiny_net(), tiny_net()
    # A large eps makes Adam's update depend on the gradient's scale, so the clip factor shows.
    engine = Engine(FakeFabric(), model, fused_adamw(model, eps=0.05), grad_clip=max_norm)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, eps=0.05, foreach=False)
    for step in range(3):
        data = batches(2, seed=10 + step)
        result = engine.step(data, loss_fn_for(model), lr=1e-2, step_number=step + 1)
        for x in data:
            (reference(x).square().mean() / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        assert float(norm) > max_norm  # the clip really scales
        ref_opt.step()
        ref_opt.zero_grad()
        assert abs(result.grad_norm - float(norm)) < 1e-6 * float(norm)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_the_clip_divisor_is_clip_grad_norms_factor():
    from pretrain.parallel import clip_divisor

    g = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 5
    for max_norm in (0.5, 1e6):  # clipping, and a norm under the limit (divisor 1)
        reference = g.clone()
        p = torch.nn.Parameter(torch.zeros(1000))
        p.grad = reference
        norm = torch.nn.utils.clip_grad_norm_([p], max_norm)
        torch.testing.assert_close(g / clip_divisor(norm, max_norm), p.grad, atol=1e-6, rtol=0)
    assert float(clip_divisor(torch.tensor(3.0), 0)) == 1.0  # --grad-clip 0: no clip


def _count_host_reads(monkeypatch) -> list[str]:
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "nonzero"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n),
                                                                                               _o(self, *a, **k))[1])
    return reads


def test_the_step_reads_nothing_from_the_device_and_counts_the_previous_step_late(monkeypatch):
    model = tiny_net()
    fabric = FakeFabric()
    engine = Engine(fabric, model, fused_adamw(model), grad_clip=1.0)
    reads = _count_host_reads(monkeypatch)
    first = engine.step(batches(4), loss_fn_for(model), lr=1e-2, step_number=1, flags={"stop": 0.0})
    assert reads == []  # no .item()/bool(): the clip and the skip are tensors in the fused kernel
    engine.step(batches(4, seed=5), loss_fn_for(model), lr=1e-2, step_number=2, flags={"stop": 1.0})
    # The only read is step 1's host copy (on CUDA: already arrived), while step 2 runs.
    assert reads == ["tolist"], reads
    monkeypatch.undo()
    assert engine.settled is first and first.flags == {"stop": 0.0}
    assert engine.settle().flags == {"stop": 1.0}


def test_the_stop_flag_travels_in_the_one_all_reduced_vector():
    model = tiny_net()
    fabric = FakeFabric()
    fabric.world_size = 2  # the fake all-reduce is the identity; what counts is how often it runs
    engine = Engine(fabric, model, fused_adamw(model), grad_clip=1.0)
    result = engine.step(batches(2), loss_fn_for(model), lr=1e-2, step_number=1, flags={"stop": 1.0})
    assert len(fabric.all_reduces) == 1 and fabric.all_reduces[0].tolist()[-1] == 1.0
    assert result.flags == {"stop": 1.0} and set(result.sums) == {"loss"}


def test_an_optimizer_without_device_skip_still_skips_and_stops_one_step_late():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    engine = Engine(FakeFabric(), model, torch.optim.RMSprop(model.parameters(), lr=0.1), grad_clip=1.0,
                    max_skipped_steps=2, stop_hint="resume elsewhere")
    assert not engine.on_device
    bad = lambda x: ((model(x) * float("nan")).sum(), {"loss": model(x).sum() * float("nan")})  # noqa: E731
    assert engine.step([torch.ones(1, 2)], bad, 0.1, step_number=1).skipped
    assert torch.equal(model.weight, before) and model.weight.grad is None
    engine.step([torch.ones(1, 2)], bad, 0.1, step_number=2)  # step 1 counted here
    assert engine.skipped_steps == 1
    with pytest.raises(TrainingError, match=r"2 steps in a row \(steps 1..2.*resume elsewhere"):
        engine.settle()


# Per-step losses of a 20-step run of pretrain/tinyllama.py on main at commit 3df9d71 (before
# this change; CPU, fp32, FSDP2 on one gloo process, 4 micro-batches per step, clip 1.0 active
# at every step: grad norms 1.8-2.5), produced by tests/test_pretrain_run.py's corpus and flags:
#   learnable_corpus(D/a, 0); learnable_corpus(D/b, 1)
#   python pretrain/tinyllama.py <base_args(D, D/out, "--no-save") with --max-steps 20>
MAIN_LOSSES = [6.5455851554870605, 6.307528495788574, 5.934535980224609, 5.538665771484375, 5.326107978820801,
               5.153379917144775, 4.663269996643066, 4.529372215270996, 4.168575286865234, 4.05491304397583,
               3.921032428741455, 3.693230628967285, 3.5540945529937744, 3.1774024963378906, 3.122751235961914,
               3.1775119304656982, 2.9264278411865234, 3.1124093532562256, 2.8008275032043457, 2.923621892929077]


@pytest.mark.parametrize("fsdp_mode", ["shard", "keep"])
def test_a_20_step_run_has_the_losses_main_produced(tmp_path, fsdp_mode):
    """--fsdp-mode keep (gathered weights kept across micro-batches) computes the same steps."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_pretrain_run import SCRIPT, base_args, env, learnable_corpus

    learnable_corpus(tmp_path / "a", 0)
    learnable_corpus(tmp_path / "b", 1)
    args = base_args(tmp_path, tmp_path / "out", "--no-save", "--fsdp-mode", fsdp_mode)
    args[args.index("--max-steps") + 1] = "20"
    proc = subprocess.run([sys.executable, str(SCRIPT)] + args, env=env(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fsdp_mode {fsdp_mode}" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows if "loss" in r]
    # Fused AdamW divides by the clip divisor where torch multiplies by the factor: ~1e-7 apart.
    assert got == pytest.approx(MAIN_LOSSES, rel=1e-5, abs=0)
