"""FSDP2 through Lightning Fabric: the strategy, the sharding of the model, gradient sync and norm.

pretrain/engine.py drives these; nothing else should need them.

Every rank holds 1/W of each parameter (`fully_shard` per transformer block, then the
root for embedding, final norm and lm_head). With `--precision bf16-mixed` the sharded
master weights and optimizer state stay fp32; FSDP2 all-gathers bf16 copies for compute
and reduce-scatters gradients in `--reduce-dtype` (fp32 by default; TinyLlama reduced in
bf16). There is no autocast: the kernels keep norms/softmax/CE in fp32 themselves. The same
code runs on CPU with gloo.
"""
from __future__ import annotations

import functools
import os

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
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


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_dtypes(precision: str, reduce_dtype: str = "fp32") -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype for compute, reduce_dtype for gradient reduction)."""
    if reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(f"--reduce-dtype {reduce_dtype!r} is not supported; choose one of {', '.join(REDUCE_DTYPES)}")
    if precision == "bf16-mixed":
        return torch.bfloat16, REDUCE_DTYPES[reduce_dtype]
    if precision == "32-true":
        return torch.float32, torch.float32
    raise ValueError(f"--precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant checkpointing keeps kwargs and works with FSDP2's hooks: the block's
    # parameters are unsharded by FSDP's pre-backward hook before the recomputation runs.
    # Nothing in a block is random (no dropout), so the RNG state need not be saved and
    # restored around every recomputation.
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


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
    # cast_forward_inputs=False: a block's inputs are the hidden states (already in the compute
    # dtype, from the bf16 embedding) and the RoPE cos/sin tables, which must stay fp32.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
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


def build_fabric(accelerator="auto", devices="auto", num_nodes=1, precision=None, reduce_dtype="fp32",
                 activation_checkpointing=False, compile=False) -> L.Fabric:
    """A Fabric whose strategy shards models with FSDP2 (see `parallelize`).

    `precision` None means bf16-mixed on CUDA, 32-true on CPU. The chosen value is
    available as `fabric.train_precision`. When the script is launched by `fabric run`,
    its --accelerator/--devices/--num-nodes (LT_* environment variables) take over.
    Call `launch(fabric)` next.
    """
    precision = precision or default_precision(accelerator)
    param_dtype, reduce_torch_dtype = precision_dtypes(precision, reduce_dtype)
    parallelize_fn = functools.partial(parallelize, param_dtype=param_dtype, reduce_dtype=reduce_torch_dtype,
                                       activation_checkpointing=activation_checkpointing, compile=compile)
    strategy = FSDP2Strategy(parallelize_fn=parallelize_fn, save_distributed_checkpoint=True)
    # Mixed precision is done by FSDP2's policy, so Fabric itself runs "32-true" (no autocast).
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision="32-true")
    fabric.train_precision = precision
    fabric.reduce_dtype = reduce_torch_dtype
    return fabric


def launch(fabric: L.Fabric) -> None:
    """Start the processes (or join them): `fabric run`/torchrun already created them, and then
    Fabric forbids `launch()`; `python script.py --devices N` needs it to spawn the other N-1."""
    if os.environ.get("LT_CLI_USED") != "1":
        fabric.launch()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (FSDP2). Off for all but the last
    micro-batch of a step: the unsharded gradients then accumulate locally (in the reduce
    dtype) and are reduced once per optimizer step."""
    inner = unwrap(model)
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(enabled)  # recurses into the blocks


def sharding_description(model: nn.Module, world_size: int) -> str:
    """How the model is distributed, in words, e.g. "FSDP2 over 2 rank(s): rank 0 holds 79,008 of 158,016"."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    sharded = isinstance(unwrap(model), FSDPModule)
    kind = "FSDP2" if sharded else "not sharded"
    return f"{kind} over {world_size} rank(s): rank 0 holds {local:,} of {total:,} parameter elements"


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of all gradients (over all shards and ranks); scales them to `max_norm` (<= 0: no clip).

    `torch.nn.utils.get_total_norm` over the DTensor gradients gives a partial norm that
    `full_tensor()` all-reduces; gradients that are plain tensors (not sharded, so the same
    on every rank) are added to it locally. The norm stays on the device (no host sync);
    it may be inf/nan, which the caller checks once per step.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, norm_type=2.0, foreach=True)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    if plain:
        norm = torch.nn.utils.get_total_norm(plain, norm_type=2.0, foreach=True)
        squares.append(norm.float().to(squares[0].device if squares else norm.device) ** 2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm is not None and max_norm > 0:
        # Scales by min(1, max_norm / total) on the device; with a non-finite total the step is skipped anyway.
        with_grad = [p for p in model.parameters() if p.grad is not None]
        for group in ([p for p in with_grad if isinstance(p.grad, DTensor)],
                      [p for p in with_grad if not isinstance(p.grad, DTensor)]):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
