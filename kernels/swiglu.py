"""SwiGLU activation: silu(gate) * up, in fp32 inside."""
import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("Triton SwiGLU: being written (kernels issue)")
