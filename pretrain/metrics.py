"""Training metrics: the metrics.jsonl file, wandb (offline by default), and the numbers
behind MFU and memory (peak FLOP/s by device name, peak memory).

Shared with finetune/: `MetricsLogger`, `peak_flops_per_second`, `measure_peak_memory_gb`,
`measure_peak_reserved_gb`.
Only rank 0 should create an enabled logger; other ranks pass enabled=False.
"""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, matched against the CUDA device name.
# Order matters: more specific names first ("H100 PCIe" before "H100").
_PEAK_BF16 = [
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),   # fp16 tensor cores (no bf16)
    ("T4", 65e12),      # fp16
]


def peak_flops_per_second(device) -> float | None:
    """Dense bf16 peak FLOP/s of `device` by its name; None on CPU or an unknown GPU (MFU is then n/a)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16:
        if key in name:
            return flops
    return None


def measure_peak_memory_gb(device) -> float:
    """Peak memory of this process in GB: CUDA's max allocated on a GPU, the peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if os.uname().sysname == "Darwin" else 1024) / 1e9


def measure_peak_reserved_gb(device) -> float | None:
    """Peak memory CUDA's caching allocator reserved from the device, in GB (what `nvidia-smi`
    sees, fragmentation included); None on CPU, where it has no meaning."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_reserved(device) / 1e9
    return None


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it readable instead of invalid
    return value


class MetricsLogger:
    """Appends `{"step": step, **metrics}` lines to out_dir/metrics.jsonl and logs to wandb.

    wandb_mode: "offline" (default; writes under out_dir/wandb, never touches the network),
    "online", or "disabled". No project means no wandb at all.
    """

    def __init__(self, out_dir, enabled: bool, wandb_project: str | None = None, wandb_mode: str = "offline",
                 run_config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._wandb = None
        if not enabled:
            return
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"--wandb-mode must be offline, online or disabled, got {wandb_mode!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file.
        self._file = open(self.path, "a", encoding="utf-8")
        if wandb_project and wandb_mode != "disabled":
            import wandb

            if wandb_mode == "offline":
                os.environ["WANDB_MODE"] = "offline"  # belt and braces: no network in offline mode
            os.environ.setdefault("WANDB_DIR", str(Path(out_dir)))
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(out_dir),
                                     config=run_config or {}, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
