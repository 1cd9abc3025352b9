"""FSDP2 through Lightning Fabric: build the Fabric, shard the model, clip gradients.

Shared with finetune/: `build_fabric`, `parallelize`, `setup_model` are its entry points.

Every rank holds 1/W of each parameter (`fully_shard` per transformer block, then the
root for embedding, final norm and lm_head). With `--precision bf16-mixed` the sharded
master weights and optimizer state stay fp32; FSDP2 all-gathers bf16 copies for compute
and reduce-scatters gradients in fp32 (MixedPrecisionPolicy). There is no autocast: the
kernels keep norms/softmax/CE in fp32 themselves. The same code runs on CPU with gloo.
"""
from __future__ import annotations

import functools
import os
import warnings

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

PRECISIONS = ("bf16-mixed", "32-true")


def default_precision(accelerator: str) -> str:
    """bf16-mixed where there is a GPU, fp32 on CPU (bf16 matmuls on CPU are slow and lossy)."""
    if accelerator == "cpu":
        return "32-true"
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        return "bf16-mixed"
    return "32-true"


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype for compute, reduce_dtype for gradient reduction)."""
    if precision == "bf16-mixed":
        return torch.bfloat16, torch.float32
    if precision == "32-true":
        return torch.float32, torch.float32
    raise ValueError(f"--precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant checkpointing keeps kwargs and works with FSDP2's hooks: the block's
    # parameters are unsharded by FSDP's pre-backward hook before the recomputation runs.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def parallelize(model: nn.Module, device_mesh, param_dtype: torch.dtype = torch.float32,
                reduce_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply activation checkpointing, torch.compile and FSDP2 to every block of `model.layers`, then the root.

    `device_mesh` is Fabric's 2-D mesh (data_parallel x tensor_parallel) or a 1-D mesh.
    Activation checkpointing and compile replace the block's `forward` in place instead of
    wrapping the module, so parameter names (and therefore checkpoints) do not change.
    """
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names and \
        "data_parallel" in device_mesh.mesh_dim_names else device_mesh
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        if activation_checkpointing:
            block.forward = functools.partial(_checkpointed_forward, block.forward)
        if compile:
            block.compile()
        # Blocks free their gathered weights after forward and re-gather them for backward.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root's parameters (embedding, norm, lm_head) are needed again right at the start
    # of backward, so keeping them gathered saves one all-gather per step.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with all ranks in the data-parallel (sharding) dimension.

    The parent's "auto" sizes put the processes of a node on the tensor-parallel axis;
    pure FSDP wants data_parallel = world size and tensor_parallel = 1, which is only
    known once the cluster environment is set up.
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def build_fabric(accelerator="auto", devices="auto", num_nodes=1, precision=None,
                 activation_checkpointing=False, compile=False) -> L.Fabric:
    """A Fabric whose strategy shards models with FSDP2 (see `parallelize`).

    `precision` None means bf16-mixed on CUDA, 32-true on CPU. The chosen value is
    available as `fabric.train_precision`. When the script is launched by `fabric run`,
    its --accelerator/--devices/--num-nodes (LT_* environment variables) take over.
    Call `launch(fabric)` next.
    """
    precision = precision or default_precision(accelerator)
    param_dtype, reduce_dtype = precision_dtypes(precision)
    parallelize_fn = functools.partial(parallelize, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                       activation_checkpointing=activation_checkpointing, compile=compile)
    strategy = FSDP2Strategy(parallelize_fn=parallelize_fn, save_distributed_checkpoint=True)
    # Mixed precision is done by FSDP2's policy, so Fabric itself runs "32-true" (no autocast).
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision="32-true")
    fabric.train_precision = precision
    return fabric


def launch(fabric: L.Fabric) -> None:
    """Start the processes (or join them): `fabric run`/torchrun already created them, and then
    Fabric forbids `launch()`; `python script.py --devices N` needs it to spawn the other N-1."""
    if os.environ.get("LT_CLI_USED") != "1":
        fabric.launch()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def setup_model(fabric: L.Fabric, model: nn.Module, seed: int | None = None) -> nn.Module:
    """fabric.setup_module (which shards) and, for a meta-device build, real initialisation.

    Build the 1.1B model under `torch.device("meta")` (or `fabric.init_module(empty_init=True)`)
    so no rank allocates full weights: Fabric materialises the shards with `to_empty` and
    runs the generic `reset_parameters` of nn.Linear/Embedding, which is not our init, so
    `init_weights` runs again on the shards. Seed every rank the same (`seed`): on CUDA,
    DTensor's RNG then gives each shard its part of one global random stream.
    A model built with real weights (a loaded checkpoint, or the CPU tests) is sharded as is.
    """
    built_on_meta = any(p.is_meta for p in model.parameters())
    with warnings.catch_warnings():
        # Fabric warns that RMSNorm has no reset_parameters(); init_weights below covers it.
        warnings.filterwarnings("ignore", message="Parameter initialization incomplete")
        wrapped = fabric.setup_module(model)
    if built_on_meta:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DTensor random operators")
            unwrap(wrapped).init_weights()
    return wrapped


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of all gradients (over all shards and ranks); scales them to `max_norm`.

    Computed on the local shards and summed with one all-reduce, so the value is the same
    on every rank; returned as an fp32 scalar (may be inf/nan, which the caller checks).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in local]).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            and all(isinstance(g, DTensor) for g in grads):
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    total = sq.sqrt()
    if max_norm is not None and max_norm > 0 and torch.isfinite(total):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in local:
            g.mul_(coef.to(g.device, g.dtype))
    return total
