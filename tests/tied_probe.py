"""Trains a tied-embedding tiny model on N CPU processes (gloo, FSDP2); tests/test_tied_training.py checks it.

    python tests/tied_probe.py CASE OUT --devices N

Rank 0 writes OUT/CASE.pt. Cases:

    train   4 engine steps (2 micro-batches each) from init_model(seed 0); a training checkpoint
            saved after step 2 (OUT/checkpoints/step-000002), the consolidated model after step 4
            (OUT/consolidated); per-step losses, whether lm_head.weight is embed.weight before and
            after training, how many tensors the optimizer holds, and the final full weights
    resume  a model initialised from another seed, then OUT/checkpoints/step-000002 loaded, then
            steps 3 and 4: their losses and the final full weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Config  # noqa: E402
from pretrain.checkpoint import load_training_checkpoint, save_consolidated, save_training_checkpoint  # noqa: E402
from pretrain.engine import CommonOptions, Engine, build_optimizer, init_model, setup_fabric  # noqa: E402
from pretrain.parallel import unwrap  # noqa: E402

CONFIG = Config.from_name("tiny", block_size=16, tie_embeddings=True)
GLOBAL_BATCH, MICRO_BATCHES, LR = 8, 2, 3e-3


def global_batch(step: int) -> torch.Tensor:
    """Two batches, alternating: steps 1 and 3 see the same rows, so the loss visibly falls."""
    g = torch.Generator().manual_seed(2000 + step % 2)
    return torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, CONFIG.block_size + 1), generator=g)


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in unwrap(model).state_dict().items()}


def tied(model) -> bool:
    inner = unwrap(model)
    return inner.lm_head.weight is inner.embed.weight


def optimizer_tensors(optimizer) -> int:
    return sum(len(group["params"]) for group in optimizer.param_groups)


def train_steps(fabric, model, optimizer, steps) -> list[float]:
    engine = Engine(fabric, model, optimizer, grad_clip=1.0)
    per_rank = GLOBAL_BATCH // fabric.world_size
    losses = []
    for step in steps:
        mine = global_batch(step)[fabric.global_rank * per_rank:(fabric.global_rank + 1) * per_rank]

        def loss_fn(rows):
            loss = model(rows[:, :-1], targets=rows[:, 1:])
            return loss / MICRO_BATCHES, {"loss": loss}

        result = engine.step(torch.chunk(mine, MICRO_BATCHES), loss_fn, lr=LR, step_number=step)
        losses.append(result.sums["loss"] / (MICRO_BATCHES * fabric.world_size))
    return losses


def build(fabric, seed: int):
    model = init_model(fabric, CONFIG, "torch", seed=seed)
    return model, build_optimizer(fabric, model, lr=LR, weight_decay=0.1)


def case_train(fabric, out: Path) -> dict:
    model, optimizer = build(fabric, seed=0)
    result = {"tied_at_start": tied(model), "optimizer_tensors": optimizer_tensors(optimizer),
              "model_tensors": len(list(unwrap(model).parameters()))}
    losses = train_steps(fabric, model, optimizer, [1, 2])
    save_training_checkpoint(fabric, out / "checkpoints", 2, model, optimizer,
                             {"step": 2}, CONFIG, args={})
    losses += train_steps(fabric, model, optimizer, [3, 4])
    save_consolidated(fabric, model, out / "consolidated")
    result.update(losses=losses, tied_at_end=tied(model), weights=full_state(model))
    return result


def case_resume(fabric, out: Path) -> dict:
    model, optimizer = build(fabric, seed=5)
    state = load_training_checkpoint(fabric, out / "checkpoints" / "step-000002", model, optimizer)
    tied_after_load = tied(model)
    losses = train_steps(fabric, model, optimizer, [3, 4])
    return {"step": state["step"], "tied_after_load": tied_after_load, "losses": losses,
            "tied_at_end": tied(model), "weights": full_state(model)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["train", "resume"])
    p.add_argument("out", type=Path)
    p.add_argument("--devices", type=int, default=1)
    args = p.parse_args()
    fabric = setup_fabric(CommonOptions(accelerator="cpu", devices=str(args.devices), sharding="fsdp"), seed=0)
    result = globals()[f"case_{args.case}"](fabric, args.out)
    if fabric.global_rank == 0:
        result["world_size"] = fabric.world_size
        torch.save(result, args.out / f"{args.case}.pt")
    fabric.barrier()


if __name__ == "__main__":
    main()
