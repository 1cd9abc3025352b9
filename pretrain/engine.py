"""The training engine shared by pretraining (pretrain/tinyllama.py), SFT and SPIN (finetune/).

Each script keeps its data and its loss; everything else about training is here, once:

    setup_fabric        Fabric with the FSDP2 strategy (pretrain/parallel.py), launched unless
                        `fabric run`/torchrun already made the processes, global RNGs seeded
    init_model          a model built on the meta device, sharded, then initialised from --seed
                        (the same weights on any number of ranks); `shard_model` for loaded ones
    build_optimizer     AdamW or RMSprop, no weight decay on norm weights
    Engine.step         one optimizer step: micro-batches with the gradient sync only on the
                        last one, clip and skip of a non-finite step decided on the device; the
                        statistics are read one step late (nothing waits for the device)
    Throughput          tokens/s over training time only (validation and saving are paused out)
    mfu_metrics         MFU in two conventions; `memory_metrics` peak allocated and reserved
    run_description     the resolved attention/kernel backends, precision and sharding, printed
                        at start and stored in OUT/config.yaml

docs/pretrain.md ("The engine") explains the choices.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

import kernels
from model import Config, Llama
from model.attention import attention_backend, select_attention_kernel
from pretrain.metrics import measure_peak_memory_gb, measure_peak_reserved_gb
from pretrain.options import opt
from pretrain.parallel import (FSDP_MODES, PRECISIONS, REDUCE_DTYPES, SHARDINGS, build_fabric, clip_divisor,
                               clip_with_norm, default_precision, grad_norm, launch, mesh_description,
                               recomputed_blocks, set_gradient_sync, sharding_description, unwrap)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to do."""


@dataclass(kw_only=True)
class CommonOptions:
    """The options all three scripts share: the Fabric setup, the kernels, wandb (see pretrain/options.py)."""

    accelerator: str = opt("auto", "cpu, cuda or auto (fabric run's flags take over)")
    devices: str = opt("auto", "processes per node (fabric run's flags take over)")
    num_nodes: int = opt(1, "nodes (fabric run's flags take over)", minimum=1)
    precision: str | None = opt(None, "default: bf16-mixed on CUDA, 32-true on CPU", choices=PRECISIONS)
    reduce_dtype: str = opt("fp32", "dtype of the gradient reduce-scatter under bf16-mixed (TinyLlama: bf16)",
                            choices=sorted(REDUCE_DTYPES))
    sharding: str = opt("hsdp", "hsdp: shard within --shard-size ranks (default: a node), replicate across "
                                "nodes; fsdp: shard over all ranks; ddp: replicate everywhere "
                                "(docs/pretrain.md, Sharding)",
                        choices=SHARDINGS)
    shard_size: int | None = opt(None, "ranks per shard group with --sharding hsdp (default: processes per node)",
                                 minimum=1)
    fsdp_mode: str = opt("shard", "shard: blocks free their gathered weights after forward and after backward; "
                                  "keep: the gathered weights stay from forward to backward and across the "
                                  "micro-batches of a step (fewer copies, more memory; docs/pretrain.md)",
                         choices=list(FSDP_MODES))
    kernels: str = opt("auto", "kernel backend: auto = Triton on CUDA (an error if Triton is missing), "
                               "PyTorch references on CPU; torch = the references everywhere",
                       choices=list(kernels.BACKENDS))
    cuda_allocator: str = opt("expandable", "CUDA caching allocator: expandable = expandable_segments:True in "
                                           "PYTORCH_CUDA_ALLOC_CONF (less fragmentation, lower reserved memory) "
                                           "unless you set expandable_segments there yourself; default = "
                                           "PyTorch's own", choices=["expandable", "default"])
    wandb_mode: str = opt("offline", "offline writes OUT/wandb and never uses the network; `wandb sync` "
                                     "uploads later", choices=["offline", "online", "disabled"])

    def common_problems(self) -> list[str]:
        if self.shard_size is not None and self.sharding != "hsdp":
            return [f"--shard-size applies to --sharding hsdp only (got --sharding {self.sharding})"]
        return []


# ---- Fabric, model, optimizer --------------------------------------------------------------
def setup_fabric(options: CommonOptions, *, activation_checkpointing=False, compile=False,
                 seed: int | None = None):
    """Fabric + FSDP2 strategy, processes launched, every global RNG seeded with `seed`.

    `options.precision` None: bf16-mixed on CUDA, 32-true on CPU (`fabric.train_precision` holds the choice).
    """
    precision = options.precision or default_precision(os.environ.get("LT_ACCELERATOR", options.accelerator))
    configure_cuda_allocator(options.cuda_allocator)
    devices = options.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    fabric = build_fabric(accelerator=options.accelerator, devices=devices, num_nodes=options.num_nodes,
                          precision=precision, reduce_dtype=options.reduce_dtype,
                          activation_checkpointing=activation_checkpointing, compile=compile,
                          sharding=options.sharding, shard_size=options.shard_size, fsdp_mode=options.fsdp_mode)
    launch(fabric)
    if seed is not None:
        from lightning.fabric.utilities.seed import seed_everything

        seed_everything(seed, verbose=False)
    return fabric


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def configure_cuda_allocator(choice: str, environ=os.environ) -> str:
    """Apply --cuda-allocator before the first CUDA allocation; returns what the allocator runs with.

    expandable: `expandable_segments:True` is added to PYTORCH_CUDA_ALLOC_CONF (kept by the
    processes Fabric spawns), unless the variable already says expandable_segments either way:
    a setting the user made is never overridden. default: nothing is changed.
    """
    current = environ.get(ALLOC_CONF, "")
    if choice == "expandable" and "expandable_segments" not in current:
        environ[ALLOC_CONF] = ",".join(filter(None, [current, "expandable_segments:True"]))
        if environ is os.environ and torch.cuda.is_available() and torch.cuda.is_initialized():
            # The allocator read the variable already: set the same option on the live allocator.
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return environ.get(ALLOC_CONF) or "PyTorch's default"


def shard_model(fabric, model: nn.Module) -> nn.Module:
    """fabric.setup_module: applies FSDP2 (pretrain/parallel.py) and materialises a meta-device build."""
    with warnings.catch_warnings():
        # Fabric warns that RMSNorm has no reset_parameters(); init_weights covers every parameter.
        warnings.filterwarnings("ignore", message="Parameter initialization incomplete")
        # ...and that DTensor's RNG is incomplete on CPU: init_weights(seed) does not use it.
        warnings.filterwarnings("ignore", message="DTensor random operators")
        return fabric.setup_module(model)


def init_model(fabric, config: Config, kernels_backend: str, seed: int,
               convert: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """A freshly initialised, sharded Llama: no rank ever holds the full fp32 weights.

    Built on the meta device, sharded and materialised by Fabric (which runs the generic
    reset_parameters, not ours), then `init_weights(seed)` draws every parameter from its
    own seeded generator, so the weights depend on --seed only: not on the world size, and
    not on whatever used the RNGs before. `convert` (e.g. --fp8's) changes the meta build's
    modules in place before sharding, keeping the parameter names.
    """
    with torch.device("meta"):
        model = Llama(config, kernels=kernels_backend)
    if convert is not None:
        convert(model)
    wrapped = shard_model(fabric, model)
    unwrap(wrapped).init_weights(seed=seed)
    return wrapped


def build_optimizer(fabric, model: nn.Module, *, name: str = "adamw", lr: float, weight_decay: float = 0.0,
                    betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW or RMSprop over the trainable parameters; matrices decay, norm weights do not
    (decaying a norm's gain towards zero only hurts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if name == "adamw":
        # The fused AdamW updates every parameter in a few kernels instead of a dozen launches
        # per tensor group, and takes the clip factor and the non-finite skip as device tensors
        # (Engine.step), on CUDA and CPU alike.
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    elif name == "rmsprop":
        optimizer = torch.optim.RMSprop(groups, lr=lr, eps=eps)
    else:
        raise ValueError(f"--optimizer {name!r} is not supported; choose adamw or rmsprop")
    return fabric.setup_optimizers(optimizer)


# ---- the optimizer step --------------------------------------------------------------------
class StepResult:
    """One optimizer step's statistics: what loss_fn reported, summed over micro-batches and
    ranks (`sums`), the gradient norm before clipping (`grad_norm`, may be nan/inf), whether
    the update was skipped (`skipped`: a non-finite sum or norm) and the step's `flags`
    (summed over ranks, e.g. the stop signal).

    The values are copied to the host without waiting for the device; the first read of any
    of them waits for that copy only. Read them one step later (the engine does, for its skip
    counters) and the host never waits for the step that is still running.
    """

    def __init__(self, keys: list[str], flag_keys: list[str], host: torch.Tensor, ready, step_number: int):
        self._keys, self._flag_keys, self._host, self._ready = keys, flag_keys, host, ready
        self.step_number = step_number
        self._values: list[float] | None = None

    def _read(self) -> list[float]:
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()  # this step's copy only, not the whole device queue
            self._values = self._host.tolist()
            self._host = self._ready = None
        return self._values

    @property
    def sums(self) -> dict[str, float]:
        return dict(zip(self._keys, self._read()))

    @property
    def flags(self) -> dict[str, float]:
        values = self._read()
        return dict(zip(self._flag_keys, values[len(self._keys):len(self._keys) + len(self._flag_keys)]))

    @property
    def grad_norm(self) -> float:
        return self._read()[-1]

    @property
    def skipped(self) -> bool:
        values = self._read()
        return not all(math.isfinite(v) for v in values[:len(self._keys)] + values[-1:])


LossFn = Callable[[object], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's wrapper (whose attribute dict is a copy of it)."""
    return getattr(optimizer, "optimizer", optimizer)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` takes `grad_scale`/`found_inf` (fused AdamW): then clipping and the
    non-finite skip happen inside its kernel, decided on the device."""
    inner = _inner_optimizer(optimizer)
    return bool(getattr(inner, "_step_supports_amp_scaling", False)) and \
        all(group.get("fused") for group in inner.param_groups)


class Engine:
    """Optimizer steps with gradient accumulation, for any loss.

    `step(micro_batches, loss_fn, lr)` calls `loss_fn(micro)` for each micro-batch; it returns
    (the tensor to backpropagate, already scaled to its share of the step's loss, and a dict of
    detached statistics to sum). FSDP2 averages gradients over ranks, so a loss that is a mean
    over the whole global batch is `micro mean x micro size / global size x world size`.

    Only the last micro-batch reduce-scatters gradients; earlier ones accumulate them unsharded
    in the reduce dtype. Nothing in a step waits for the device when the optimizer is fused
    AdamW (the default): the statistics, the step's `flags` and the gradient norm go into one
    vector, all-reduced once, whose host copy is read during the next step; the clip factor
    and the non-finite skip reach the fused kernel as tensors (`grad_scale`, `found_inf`),
    which leaves parameters, moments and step counts untouched on a skipped step. Other
    optimizers (RMSprop) read the finite flag on the host before stepping (one wait per step).
    The skip counters, and the stop after `max_skipped_steps`, therefore run one step late;
    `settle()` brings them up to date (before a save, at the end).
    """

    def __init__(self, fabric, model: nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float,
                 max_skipped_steps: int = 10, skipped_steps: int = 0, stop_hint: str = ""):
        self.fabric, self.model, self.optimizer = fabric, model, optimizer
        self.grad_clip = grad_clip
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = skipped_steps  # over the whole run (restored on resume), up to the settled step
        self.consecutive_skips = 0
        self.stop_hint = stop_hint
        self.pending: StepResult | None = None  # the last step, not yet counted
        self.settled: StepResult | None = None  # the last step counted
        self.on_device = skips_on_device(optimizer)
        self.keep_gathered = getattr(fabric, "fsdp_mode", "shard") == "keep"

    def step(self, micro_batches: Iterable, loss_fn: LossFn, lr: float, step_number: int,
             flags: dict[str, float] | None = None) -> StepResult:
        """One optimizer step; `step_number` (1-based) is for messages only. `flags` (host
        numbers, e.g. {"stop": 1.0}) are summed over ranks with the statistics, at no extra
        collective; read them from the returned result (one step later, to wait for nothing)."""
        fabric = self.fabric
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        items = list(micro_batches)
        if not items:
            raise ValueError("an optimizer step needs at least one micro-batch")
        sums: dict[str, torch.Tensor] = {}
        try:
            for i, micro in enumerate(items):
                set_gradient_sync(self.model, i == len(items) - 1, self.keep_gathered)
                loss, stats = loss_fn(micro)
                fabric.backward(loss)
                for key, value in stats.items():
                    value = value.detach().float().reshape(())
                    sums[key] = sums[key] + value if key in sums else value
        finally:
            set_gradient_sync(self.model, True, self.keep_gathered)
        keys, flag_keys = sorted(sums), sorted(flags or {})
        device = next(iter(sums.values())).device if sums else fabric.device
        # Flags are filled on the device (no host-to-device copy to wait for).
        parts = [sums[k] for k in keys] + [torch.full((), float(flags[k]), device=device) for k in flag_keys]
        vector = torch.stack(parts) if parts else torch.zeros(0, device=device)
        if fabric.world_size > 1 and parts:
            vector = fabric.all_reduce(vector, reduce_op="sum")
        norm = grad_norm(self.model).reshape(1).float().to(vector.device)
        finite = torch.isfinite(norm).all() & torch.isfinite(vector[:len(keys)]).all()
        host, ready = _copy_to_host(torch.cat([vector.float(), norm]))
        # The previous step's numbers have long arrived: counting them now costs no wait.
        self.settle()
        self.pending = StepResult(keys, flag_keys, host, ready, step_number)
        if self.on_device:
            inner = _inner_optimizer(self.optimizer)
            inner.grad_scale = clip_divisor(norm.reshape(()), self.grad_clip)
            inner.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del inner.grad_scale, inner.found_inf
        else:
            clip_with_norm(self.model, self.grad_clip, norm.reshape(()))
            if bool(finite):  # the one host wait of an optimizer that cannot skip on the device
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.pending

    def settle(self) -> StepResult | None:
        """Count the pending step (waiting for its numbers if they are not there yet): skip
        counters, the message of a skipped step, and TrainingError after too many in a row.
        Returns the last settled step."""
        result, self.pending = self.pending, None
        if result is None:
            return self.settled
        self.settled = result
        if result.skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            shown = ", ".join(f"{k} {v:.4g}" for k, v in result.sums.items())
            self.fabric.print(f"step {result.step_number}: non-finite {shown} / grad norm {result.grad_norm}; "
                              f"update skipped ({self.consecutive_skips} in a row)")
        else:
            self.consecutive_skips = 0
        if self.consecutive_skips >= self.max_skipped_steps:
            last = result.step_number
            first = last - self.consecutive_skips + 1
            raise TrainingError(
                f"the loss or gradient norm was non-finite for {self.consecutive_skips} steps in a row "
                f"(steps {first}..{last}; limit --max-skipped-steps {self.max_skipped_steps}). "
                f"{self.stop_hint}")
        return result


def _copy_to_host(vector: torch.Tensor):
    """(host tensor, event to wait on or None): a copy that does not wait for the device on CUDA."""
    if vector.device.type != "cuda":
        return vector.detach().cpu(), None
    host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
    host.copy_(vector, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


# ---- throughput, MFU, memory ---------------------------------------------------------------
class Throughput:
    """Tokens per second over the time spent training, in windows between two `read()`s.

    Validation and checkpoint saves run inside `paused()`, whose time is left out, so the
    rate does not dip at every validation. `clock` is replaceable for tests.
    """

    def __init__(self, device, clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.clock = clock
        self._restart()

    def _restart(self) -> None:
        self.window_start = self.clock()
        self.paused_seconds = 0.0
        self.data_wait = 0.0
        self.tokens = 0
        self.sequences = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, tokens: int, sequences: int) -> None:
        self.tokens += tokens
        self.sequences += sequences

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    @contextmanager
    def paused(self):
        self._sync()  # queued training work belongs to training time
        start = self.clock()
        try:
            yield
        finally:
            self._sync()
            self.paused_seconds += self.clock() - start

    def read(self) -> dict:
        """tokens/s, training seconds, mean sequence length and data-wait share of the window; starts the next."""
        self._sync()
        seconds = max(self.clock() - self.window_start - self.paused_seconds, 1e-9)
        out = {"tokens_per_sec": self.tokens / seconds, "train_seconds": seconds,
               "mean_seq_len": self.tokens / self.sequences if self.sequences else 0.0,
               "data_wait_share": self.data_wait / seconds}
        self._restart()
        return out


MFU_CONVENTION = "mfu: FLOPs/token = 6·N_non-embedding + 12·L·d·T; mfu_6n: 6·N_total (TinyLlama's)"


def mfu_metrics(config: Config, seq_len: float, tokens_per_sec: float, world_size: int,
                peak_flops: float | None) -> dict:
    """Model FLOPs utilisation in two conventions (None where the device's peak is unknown, e.g. CPU).

    mfu      6·N_non-embedding + 12·L·d·T per token: the matmuls that run, attention included
             (the embedding is a lookup, not a matmul)
    mfu_6n   6·N_total per token, TinyLlama's convention (its 56% on A100s), for comparison
    """
    if not peak_flops:
        return {"mfu": None, "mfu_6n": None}
    budget = peak_flops * world_size
    return {"mfu": config.flops_per_token(max(1, round(seq_len))) * tokens_per_sec / budget,
            "mfu_6n": 6 * config.num_params * tokens_per_sec / budget}


def memory_metrics(device) -> dict:
    return {"peak_memory_gb": measure_peak_memory_gb(device), "peak_reserved_gb": measure_peak_reserved_gb(device)}


def _dynamo_counters():
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return counters


def graph_breaks() -> int:
    """torch.compile graph breaks so far in this process (0 without --compile)."""
    counters = _dynamo_counters()
    return 0 if counters is None else int(sum(counters["graph_break"].values()))


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process: at least one with --compile
    (0 graph breaks alone would also be what no compilation at all reports)."""
    counters = _dynamo_counters()
    return 0 if counters is None else int(counters["stats"]["unique_graphs"])


# ---- the attention kernel ------------------------------------------------------------------
def select_attention(fabric, config: Config, micro_batch: int, compute_dtype: torch.dtype) -> dict:
    """Measure the causal attention kernels at the run's shapes (CUDA) and use the fastest on every
    rank (timings summed over ranks); printed, and returned for OUT/config.yaml."""
    if config.sliding_window is not None and config.sliding_window < config.block_size:
        return {}  # a window goes through flash-attn's window or a mask: the causal measurement says nothing

    def agree(timings: dict) -> dict:
        names = sorted(timings)
        vector = torch.tensor([math.inf if timings[k] is None else timings[k] for k in names], device=fabric.device)
        if fabric.world_size > 1:
            vector = fabric.all_reduce(vector, reduce_op="sum")
        return {k: (v if math.isfinite(v) else None) for k, v in zip(names, vector.tolist())}

    kernel, timings = select_attention_kernel(fabric.device, compute_dtype, micro_batch, config.block_size,
                                              config.n_head, config.n_kv_head, config.head_dim, agree=agree)
    if timings:
        shown = ", ".join(f"{k} {'refused' if ms is None else f'{ms:.2f} ms'}" for k, ms in timings.items())
        fabric.print(f"attention kernel: {kernel}, the fastest causal forward + backward at micro-batch "
                     f"{micro_batch} x {config.block_size} (summed over {fabric.world_size} rank(s): {shown})")
    return {"attention_timings_ms": timings}


# ---- what runs ------------------------------------------------------------------------------
def run_description(fabric, model: nn.Module | None, kernels_backend: str) -> dict:
    """Resolved backends, precision and sharding: printed at start and stored in OUT/config.yaml.

    Without `model` (SPIN before its first training stage) the sharding and the blocks that
    activation checkpointing recomputes are not known yet.
    """
    precision = getattr(fabric, "train_precision", "32-true")
    compute = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    reduce_dtype = getattr(fabric, "reduce_dtype", torch.float32)
    return {
        "attention": attention_backend(fabric.device, compute),
        "kernels": kernels.resolve_backend(kernels_backend, fabric.device),
        "sharding": sharding_description(fabric, model) if model is not None else
        f"{mesh_description(fabric)} (training stages)",
        **({"activation_checkpointing": recomputed_blocks(model)} if model is not None else {}),
        "precision": precision,
        "reduce_dtype": str(reduce_dtype).replace("torch.", ""),
        "fsdp_mode": getattr(fabric, "fsdp_mode", "shard"),
        "world_size": fabric.world_size,
        "device": torch.cuda.get_device_name(fabric.device) if fabric.device.type == "cuda" else str(fabric.device),
        "cuda_allocator": (os.environ.get(ALLOC_CONF) or "PyTorch's default") if fabric.device.type == "cuda"
        else "n/a (no CUDA)",
        "torch": torch.__version__,
    }


def print_run_description(fabric, description: dict) -> None:
    shown = ("attention", "kernels", "precision", "reduce_dtype", "fsdp_mode", "device", "cuda_allocator")
    fabric.print("backends: " + ", ".join(f"{k} {description[k]}" for k in shown if k in description))
    fabric.print(f"sharding: {description['sharding']}")
