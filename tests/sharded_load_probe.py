"""Loads a checkpoint into a sharded model on N CPU processes (gloo); tests/test_sharded_load.py checks the results.

    python tests/sharded_load_probe.py CASE CKPT RESULT_PREFIX --devices N [--sharding S] [--precision P] [--old]

Every rank writes RESULT_PREFIX.rankR.pt. Cases:

    parity  the start model loaded the old way (the whole model on every rank, then sharded:
            `shard_model(fabric, load_model_from_any(CKPT))`) and the new way
            (pretrain/sharded_load.py): each rank's shards (values compared exactly) and
            placements, the dtypes, the gathered weights of the new load, and the loss and updated weights
            after one identical SGD step on each
    memory  only one way (--old: the old one): this rank's resident memory just before the load,
            its peak (VmHWM) until then and its peak after the load, in bytes
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import load_model_from_any  # noqa: E402
from pretrain.engine import CommonOptions, setup_fabric, shard_model  # noqa: E402
from pretrain.parallel import unwrap  # noqa: E402
from pretrain.sharded_load import load_sharded  # noqa: E402


def old_load(fabric, ckpt):
    return shard_model(fabric, load_model_from_any(ckpt, kernels="torch"))


def new_load(fabric, ckpt):
    return load_sharded(fabric, ckpt, kernels="torch")


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def sgd_step(fabric, model) -> tuple[float, dict]:
    """Loss of a fixed batch, then one SGD step; returns the loss and this rank's updated shards."""
    config = unwrap(model).config
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    fabric.backward(loss)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    return float(loss.detach()), {n: local(p).detach().clone() for n, p in unwrap(model).named_parameters()}


def case_parity(fabric, args) -> dict:
    old, new = old_load(fabric, args.ckpt), new_load(fabric, args.ckpt)
    old_params, new_params = dict(unwrap(old).named_parameters()), dict(unwrap(new).named_parameters())
    # values compared in fp32: the old load kept a bf16 file's dtype, the new one upcasts (exactly)
    same = {n: torch.equal(local(old_params[n]).float(), local(p)) for n, p in new_params.items()}
    same_placements = all(getattr(old_params[n], "placements", None) == getattr(p, "placements", None)
                          for n, p in new_params.items())
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in new_params.items()}
    old_loss, old_after = sgd_step(fabric, old)
    new_loss, new_after = sgd_step(fabric, new)
    return {"names": sorted(old_params) == sorted(new_params), "same": same, "full": full,
            "dtypes": {n: p.dtype for n, p in new_params.items()}, "same_placements": same_placements,
            "old_dtypes": {n: p.dtype for n, p in old_params.items()},
            "local_numel": sum(local(p).numel() for p in new_params.values()),
            "old_loss": old_loss, "new_loss": new_loss,
            "same_after_step": all(torch.equal(old_after[n], new_after[n]) for n in new_after)}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
    exec from the process that forked us, so under a big pytest process (a whole suite run) it
    starts above anything the load does."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line (this probe needs Linux)")


def case_memory(fabric, args) -> dict:
    gc.collect()
    fabric.barrier()
    before, peak_before = resident_bytes(), peak_resident_bytes()
    model = (old_load if args.old else new_load)(fabric, args.ckpt)
    return {"before": before, "peak_before": peak_before, "peak": peak_resident_bytes(),
            "local_bytes": sum(local(p).numel() * local(p).element_size() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["parity", "memory"])
    p.add_argument("ckpt", type=Path)
    p.add_argument("result", type=Path)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--sharding", default="fsdp")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--old", action="store_true")
    args = p.parse_args()
    fabric = setup_fabric(CommonOptions(accelerator="cpu", devices=str(args.devices), precision=args.precision,
                                        sharding=args.sharding, kernels="torch"), seed=0)
    result = globals()[f"case_{args.case}"](fabric, args)
    result["world_size"] = fabric.world_size
    torch.save(result, args.result.with_name(f"{args.result.name}.rank{fabric.global_rank}.pt"))
    fabric.barrier()


if __name__ == "__main__":
    main()
