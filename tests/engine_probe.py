"""Runs one piece of pretrain/engine.py on N CPU processes (gloo) and saves what tests/test_engine.py checks.

    python tests/engine_probe.py CASE RESULT.pt --devices N [--seed S]

Fabric launches the other processes itself (as `python pretrain/tinyllama.py --devices N`
does); rank 0 writes RESULT.pt. Cases:

    accumulation  3 optimizer steps of 4 micro-batches: per-step losses and the number of
                  reduce-scatters per step (--sync-every-micro-batch emulates the old loop)
    clip          the engine's clipped gradient norm and the clipped full gradients
    clip_mixed    the norm when sharded (DTensor) and plain gradients mix
    init          the full initial weights of init_model(seed)
    rope          the dtype of the cos/sin tables that reach apply_rope under a bf16 policy
    recompute     how often each block's MLP runs in one forward and in forward + backward
                  (setup_fabric with --activation-checkpointing: twice, once recomputed), the
                  loss and the full gradients
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
import pretrain.engine as engine  # noqa: E402
from model import Config  # noqa: E402
from pretrain.engine import CommonOptions, Engine, build_optimizer, init_model, setup_fabric  # noqa: E402
from pretrain.parallel import clip_grad_norm, unwrap  # noqa: E402

CONFIG = Config.from_name("tiny", block_size=16)
GLOBAL_BATCH = 8  # rows per optimizer step over all ranks; the probe splits each rank's share into micro-batches


def global_batch(step: int) -> torch.Tensor:
    """The same (GLOBAL_BATCH, T+1) token rows on every rank and world size."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, CONFIG.block_size + 1), generator=g)


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in unwrap(model).state_dict().items()}


def count_reduce_scatters() -> list[int]:
    """Wrap the process-group reduce-scatter calls FSDP2 makes; returns a live counter."""
    counter = [0]
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, **kwargs):
            counter[0] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)
    return counter


def rank_rows(rows: torch.Tensor, fabric) -> torch.Tensor:
    per_rank = rows.shape[0] // fabric.world_size
    return rows[fabric.global_rank * per_rank:(fabric.global_rank + 1) * per_rank]


def case_accumulation(fabric, args) -> dict:
    if args.sync_every_micro_batch:
        engine.set_gradient_sync = lambda model, *sync_args: None  # the loop before the fix
    model = init_model(fabric, CONFIG, "torch", seed=args.seed)
    optimizer = build_optimizer(fabric, model, lr=1e-2)
    eng = Engine(fabric, model, optimizer, grad_clip=1.0)
    counter = count_reduce_scatters()
    losses, per_step = [], []
    for step in range(3):
        mine = rank_rows(global_batch(step), fabric)
        micro = torch.split(mine, args.micro_batch_size)

        def loss_fn(rows, n=len(micro)):
            loss = model(rows[:, :-1], targets=rows[:, 1:])
            return loss / n, {"loss": loss}

        before = counter[0]
        result = eng.step(micro, loss_fn, lr=1e-2, step_number=step + 1)
        per_step.append(counter[0] - before)
        losses.append(result.sums["loss"] / (len(micro) * fabric.world_size))
    return {"losses": losses, "reduce_scatters_per_step": per_step, "weights": full_state(model)}


def case_clip(fabric, args) -> dict:
    model = init_model(fabric, CONFIG, "torch", seed=args.seed)
    rows = rank_rows(global_batch(0), fabric)
    loss = model(rows[:, :-1], targets=rows[:, 1:])
    fabric.backward(loss)  # FSDP averages over ranks: the gradient of the global mean loss
    norm = clip_grad_norm(model, args.max_norm)
    grads = {k: p.grad.full_tensor() for k, p in unwrap(model).named_parameters()}
    return {"norm": norm, "grads": grads, "weights": full_state(model)}


def mixed_model() -> torch.nn.Module:
    """Two linears with fixed weights: the probe shards the first only."""
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def mixed_input() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(4))


def case_clip_mixed(fabric, args) -> dict:
    """Sharded and plain gradients together: the first linear under FSDP2, the second not
    (the same input on every rank, so its plain gradient is the same everywhere)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mixed_model()
    fully_shard(model[0], mesh=init_device_mesh("cpu", (fabric.world_size,)))
    model(mixed_input()).square().sum().backward()
    norm = clip_grad_norm(model, args.max_norm)
    return {"norm": norm}


def case_init(fabric, args) -> dict:
    torch.manual_seed(12345 + fabric.global_rank)  # whatever the global RNG holds must not matter
    return {"weights": full_state(init_model(fabric, CONFIG, "torch", seed=args.seed))}


def case_rope(fabric, args) -> dict:
    seen = []
    reference = kernels.get_ops("torch").apply_rope

    def spy(q, k, cos, sin):
        seen.append((str(q.dtype), str(cos.dtype), str(sin.dtype)))
        return reference(q, k, cos, sin)

    kernels.get_ops("torch").apply_rope = spy
    model = init_model(fabric, CONFIG, "torch", seed=args.seed)
    rows = global_batch(0)[:2]
    with torch.no_grad():
        model(rows[:, :-1], targets=rows[:, 1:])
    return {"seen": seen}


def case_recompute(fabric, args) -> dict:
    model = init_model(fabric, CONFIG, "torch", seed=args.seed)
    calls = [0] * CONFIG.n_layer
    for i, block in enumerate(unwrap(model).layers):
        # a pre-hook: the recomputation stops (early) inside the MLP, once its last saved tensor is back
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    rows = global_batch(0)[:2]
    loss = model(rows[:, :-1], targets=rows[:, 1:])
    after_forward = list(calls)
    fabric.backward(loss)
    grads = {k: p.grad.full_tensor() for k, p in unwrap(model).named_parameters()}
    return {"after_forward": after_forward, "after_backward": list(calls), "loss": loss.item(), "grads": grads}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["accumulation", "clip", "clip_mixed", "init", "rope", "recompute"])
    p.add_argument("result", type=Path)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--max-norm", type=float, default=0.5)
    p.add_argument("--sync-every-micro-batch", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args()
    fabric = setup_fabric(CommonOptions(accelerator="cpu", devices=str(args.devices), precision=args.precision),
                          activation_checkpointing=args.activation_checkpointing, seed=args.seed)
    result = globals()[f"case_{args.case}"](fabric, args)
    if fabric.global_rank == 0:
        result["world_size"] = fabric.world_size
        torch.save(result, args.result)
    fabric.barrier()


if __name__ == "__main__":
    main()
