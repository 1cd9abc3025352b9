"""FP8 training of the block linears (--fp8) through torchao's float8 training.

Every nn.Linear inside the transformer blocks (qkv, attention output, gate/up, down) becomes
torchao's Float8Linear: its matmuls run in float8 with dynamic tensor-wise scales, its
weights stay the same fp32 Parameters under the same names, so checkpoints, the optimizer
and `--resume` do not change (a run may switch --fp8 on or off at a resume). lm_head stays
as it is, inside the fused linear + cross-entropy. Under FSDP2 the weights are all-gathered
in float8 (half the bytes of bf16) where torchao supports it (CUDA). The conversion runs on
the meta-device build, before sharding.

The checks come first, at start: torchao missing, or no CUDA device of capability 8.9 or
newer (Ada, Hopper: float8 tensor cores), is an error naming the fix. `emulate` (tests on
CPU) runs torchao's emulation, which casts to float8 and back and multiplies in high precision.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def fp8_problem(device: torch.device, emulate: bool) -> str | None:
    """Why --fp8 cannot run here (None: it can)."""
    try:
        import torchao  # noqa: F401
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except ImportError as e:
        return f"--fp8 needs torchao's float8 training ({e}); install it: pip install -e '.[fp8]' (torchao>=0.10)"
    if emulate:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return "--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); this run is on " \
               f"{device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"--fp8 needs compute capability 8.9 or newer (float8 tensor cores); " \
               f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: drop --fp8"
    return None


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """The linears converted: those of the transformer blocks (not lm_head)."""
    return fqn.startswith("layers.") and isinstance(module, nn.Linear)


def convert_fp8(model: nn.Module, emulate: bool, fsdp_all_gather: bool) -> int:
    """Swap the block linears of `model` for Float8Linear in place; returns how many were converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(emulate=emulate, enable_fsdp_float8_all_gather=fsdp_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=is_block_linear)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())


def fp8_description(converted: int, fsdp_all_gather: bool, emulate: bool) -> str:
    import torchao

    return (f"fp8: torchao {torchao.__version__} float8 training on {converted} block linears (lm_head stays in "
            f"the fused linear + cross-entropy); float8 all-gather {'on' if fsdp_all_gather else 'off'}"
            + ("; emulated (tests)" if emulate else ""))


def after_optimizer_step(model: nn.Module, fsdp_all_gather: bool) -> None:
    """With float8 all-gather, the scales of the next all-gather in one go for all weights
    (torchao's recommendation: one all-reduce instead of one per weight)."""
    if fsdp_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
