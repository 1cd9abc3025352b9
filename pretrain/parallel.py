"""FSDP2 through Lightning Fabric: the strategy, the sharding of the model, gradient sync and norm.

pretrain/engine.py drives these; nothing else should need them.

`--sharding` picks the data-parallel mesh that `fully_shard` (per transformer block, then the
root for embedding, final norm and lm_head) gets:

    fsdp   1-D mesh of all W ranks: every rank holds 1/W of each parameter
    hsdp   2-D mesh (replicate W/S x shard S): sharded within a group of S ranks (default: the
           processes of a node), replicated across groups; gradients are reduce-scattered in
           the group, then all-reduced across groups
    ddp    2-D mesh (replicate W x shard 1): every rank holds everything; FSDP2's HSDP with
           shard groups of one is plain data parallelism (one gradient all-reduce)

All three give the same DTensor parameters to the checkpoint code, so a checkpoint loads
in any mode and on any world size. With `--precision bf16-mixed` the sharded
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
SHARDINGS = ("fsdp", "hsdp", "ddp")
# shard: each block frees its gathered (bf16) weights after forward and after backward;
# keep: a block's gathered weights stay from its forward through its backward, and between the
# micro-batches of a step (freed after the last backward): fewer all-gathers and copies, more memory.
FSDP_MODES = ("shard", "keep")


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
                compile: bool = False, fsdp_mode: str = "shard") -> nn.Module:
    """Apply activation checkpointing, torch.compile and FSDP2 to every block of `model.layers`, then the root.

    `device_mesh` is the data-parallel mesh: 1-D (shard over all ranks) or 2-D (replicate x
    shard, FSDP2's HSDP); Fabric's 2-D mesh (data_parallel x tensor_parallel) also works.
    Activation checkpointing and compile replace the block's `forward` in place instead of
    wrapping the module, so parameter names (and therefore checkpoints) do not change.
    `fsdp_mode` (FSDP_MODES) decides whether blocks free their gathered weights after forward;
    the parameters and checkpoints are the same DTensors in every mode.
    """
    if fsdp_mode not in FSDP_MODES:
        raise ValueError(f"--fsdp-mode {fsdp_mode!r} is not supported; choose one of {', '.join(FSDP_MODES)}")
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
        # shard: blocks free their gathered weights after forward and re-gather them for backward;
        # keep: the forward's gathered weights serve the backward too.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=fsdp_mode == "shard")
    # The root's parameters (embedding, norm, lm_head) are needed again right at the start
    # of backward, so keeping them gathered saves one all-gather per step. A tied embedding
    # and lm_head (one Parameter) must be in one FSDP unit, as torchtitan keeps them: this one,
    # which gathers it once for both uses and reduces its two gradient contributions together.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def recomputed_blocks(model: nn.Module) -> str:
    """How many blocks recompute their forward in backward, read off the blocks themselves
    (the forward `parallelize` installed), e.g. "2 of 2 blocks"; recorded in OUT/config.yaml."""
    blocks = list(unwrap(model).layers)
    recomputed = sum(isinstance(b.forward, functools.partial) and b.forward.func is _checkpointed_forward
                     for b in blocks)
    return f"{recomputed} of {len(blocks)} blocks"


def mesh_shape(sharding: str, world_size: int, processes_per_node: int, shard_size: int | None) -> tuple[int, int]:
    """(replicate, shard) sizes of the data-parallel mesh for `--sharding`; ValueError naming the flag if impossible."""
    if sharding not in SHARDINGS:
        raise ValueError(f"--sharding {sharding!r} is not supported; choose one of {', '.join(SHARDINGS)}")
    if shard_size is not None and sharding != "hsdp":
        raise ValueError(f"--shard-size applies to --sharding hsdp only (got --sharding {sharding})")
    if sharding == "fsdp":
        return 1, world_size
    if sharding == "ddp":
        return world_size, 1
    size = shard_size or processes_per_node
    if size < 1 or world_size % size:
        raise ValueError(f"--shard-size {size} must divide the world size {world_size} "
                         f"({'given' if shard_size else 'default: the processes per node'}); "
                         f"pass a divisor of {world_size} as --shard-size")
    return world_size // size, size


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with all ranks in the data-parallel dimension, meshed for `--sharding`.

    The parent's "auto" sizes put the processes of a node on the tensor-parallel axis;
    FSDP wants data_parallel = world size and tensor_parallel = 1, which is only known
    once the cluster environment is set up. The parent's mesh stays as it is (Fabric reads
    it); the model is sharded on `self.dp_mesh`: the parent's 1-D data-parallel mesh for
    fsdp, a (replicate, shard) mesh for hsdp and ddp.
    """

    def __init__(self, parallelize_fn, sharding: str = "hsdp", shard_size: int | None = None, **kwargs):
        super().__init__(parallelize_fn=lambda model, _mesh: parallelize_fn(model, self.dp_mesh), **kwargs)
        self.sharding, self.shard_size = sharding, shard_size
        self.dp_mesh = None

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
        replicate, shard = mesh_shape(self.sharding, self.world_size, self.num_processes, self.shard_size)
        if self.sharding == "fsdp":
            self.dp_mesh = self.device_mesh["data_parallel"]
        else:
            from torch.distributed.device_mesh import init_device_mesh

            self.dp_mesh = init_device_mesh(self.root_device.type, (replicate, shard),
                                            mesh_dim_names=("replicate", "shard"))


def build_fabric(accelerator="auto", devices="auto", num_nodes=1, precision=None, reduce_dtype="fp32",
                 activation_checkpointing=False, compile=False, sharding="hsdp",
                 shard_size: int | None = None, fsdp_mode: str = "shard") -> L.Fabric:
    """A Fabric whose strategy shards models with FSDP2 (see `parallelize`).

    `precision` None means bf16-mixed on CUDA, 32-true on CPU. The chosen value is
    available as `fabric.train_precision`. When the script is launched by `fabric run`,
    its --accelerator/--devices/--num-nodes (LT_* environment variables) take over.
    Call `launch(fabric)` next.
    """
    precision = precision or default_precision(accelerator)
    param_dtype, reduce_torch_dtype = precision_dtypes(precision, reduce_dtype)
    parallelize_fn = functools.partial(parallelize, param_dtype=param_dtype, reduce_dtype=reduce_torch_dtype,
                                       activation_checkpointing=activation_checkpointing, compile=compile,
                                       fsdp_mode=fsdp_mode)
    strategy = FSDP2Strategy(parallelize_fn, sharding=sharding, shard_size=shard_size,
                             save_distributed_checkpoint=True)
    # Mixed precision is done by FSDP2's policy, so Fabric itself runs "32-true" (no autocast).
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision="32-true")
    fabric.train_precision = precision
    fabric.reduce_dtype = reduce_torch_dtype
    fabric.fsdp_mode = fsdp_mode
    return fabric


def launch(fabric: L.Fabric) -> None:
    """Start the processes (or join them): `fabric run`/torchrun already created them, and then
    Fabric forbids `launch()`; `python script.py --devices N` needs it to spawn the other N-1."""
    if os.environ.get("LT_CLI_USED") != "1":
        fabric.launch()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def set_gradient_sync(model: nn.Module, enabled: bool, keep_gathered: bool = False) -> None:
    """Whether the next backward reduce-scatters gradients (FSDP2). Off for all but the last
    micro-batch of a step: the unsharded gradients then accumulate locally (in the reduce
    dtype) and are reduced once per optimizer step. With `keep_gathered` (--fsdp-mode keep)
    the gathered weights are also kept after every backward but the last one, so the next
    micro-batch's forward gathers nothing."""
    inner = unwrap(model)
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(enabled)  # recurses into the blocks
        if keep_gathered:
            inner.set_reshard_after_backward(enabled)


def mesh_description(fabric) -> str:
    """The sharding mode and mesh in words, e.g. "hsdp (FSDP2, replicate 2 x shard 4) over 8 rank(s)"."""
    strategy = fabric.strategy
    sharding = getattr(strategy, "sharding", "fsdp")
    mesh = getattr(strategy, "dp_mesh", None)
    if mesh is None:
        return f"{sharding} (FSDP2) over {fabric.world_size} rank(s)"
    if mesh.ndim == 2:
        return f"{sharding} (FSDP2, replicate {mesh.size(0)} x shard {mesh.size(1)}) over {fabric.world_size} rank(s)"
    return f"{sharding} (FSDP2, shard {mesh.size()}) over {fabric.world_size} rank(s)"


def sharding_description(fabric, model: nn.Module) -> str:
    """How the model is distributed, in words, e.g.
    "fsdp (FSDP2, shard 2) over 2 rank(s): rank 0 holds 79,008 of 158,016 parameter elements"."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    kind = mesh_description(fabric) if isinstance(unwrap(model), FSDPModule) else \
        f"not sharded over {fabric.world_size} rank(s)"
    return f"{kind}: rank 0 holds {local:,} of {total:,} parameter elements"


@torch.no_grad()
def grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of all gradients (over all shards and ranks), on the device (no host sync).

    `torch.nn.utils.get_total_norm` over the DTensor gradients gives a partial norm that
    `full_tensor()` all-reduces; gradients that are plain tensors (not sharded, so the same
    on every rank) are added to it locally. It may be inf/nan, which the engine checks.
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
    return torch.stack(squares).sum().sqrt()


def clip_divisor(total: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """What to divide the gradients by to clip them to `max_norm` (1 when under it or with no clip):
    `1 / min(1, max_norm / (total + 1e-6))`, torch's clip_grad_norm_ factor, as a device
    tensor for the fused optimizer's `grad_scale`."""
    if max_norm is None or max_norm <= 0:
        return torch.ones((), device=total.device)
    return 1.0 / torch.clamp(max_norm / (total.float() + 1e-6), max=1.0)


@torch.no_grad()
def clip_with_norm(model: nn.Module, max_norm: float | None, total: torch.Tensor) -> None:
    """Scale the gradients in place by min(1, max_norm / total) on the device (<= 0: no clip)."""
    if max_norm is None or max_norm <= 0:
        return
    with_grad = [p for p in model.parameters() if p.grad is not None]
    for group in ([p for p in with_grad if isinstance(p.grad, DTensor)],
                  [p for p in with_grad if not isinstance(p.grad, DTensor)]):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """`grad_norm`, then the gradients clipped in place to `max_norm` (<= 0: no clip); returns the norm."""
    total = grad_norm(model)
    clip_with_norm(model, max_norm, total)
    return total
