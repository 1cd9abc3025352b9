"""The training machinery finetune shares with pretraining: Fabric, metrics, checkpoints.

Everything comes from pretrain/ (`pretrain.parallel`, `pretrain.metrics`, `pretrain.checkpoint`)
so SFT and SPIN run on the same Fabric + FSDP2 setup, write the same metrics.jsonl and the same
consolidated checkpoints as pretraining. While a pretrain module is missing (it is developed in
parallel) a minimal local stand-in with the same signature is used; `USING_FALLBACK` names them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

USING_FALLBACK: list[str] = []

try:
    from pretrain.parallel import build_fabric, clip_grad_norm, setup_model
except ImportError:
    USING_FALLBACK.append("pretrain.parallel")

    def clip_grad_norm(model, max_norm):
        import torch

        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def build_fabric(accelerator="auto", devices="auto", num_nodes=1, precision=None,
                     activation_checkpointing=False, compile=False):
        """Stand-in: a plain single-strategy Fabric (no FSDP2)."""
        import lightning as L

        return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        precision=precision, strategy="auto")

    def setup_model(fabric, model):
        return fabric.setup_module(model)

try:
    from pretrain.metrics import MetricsLogger
except ImportError:
    USING_FALLBACK.append("pretrain.metrics")

    class MetricsLogger:
        """Stand-in: appends {"step": step, **metrics} lines to out_dir/metrics.jsonl."""

        def __init__(self, out_dir, enabled: bool, wandb_project=None, wandb_mode="offline", run_config=None):
            self.enabled = enabled
            self.path = Path(out_dir) / "metrics.jsonl"
            if enabled:
                self.path.parent.mkdir(parents=True, exist_ok=True)

        def log(self, metrics: dict, step: int) -> None:
            if self.enabled:
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")

        def close(self) -> None:
            pass

try:
    from pretrain.checkpoint import load_model_from_any, save_consolidated
except ImportError:
    USING_FALLBACK.append("pretrain.checkpoint")

    def _unwrap(model):
        return getattr(model, "module", model)

    def save_consolidated(fabric, model, directory, tokenizer=None, extra_files=None):
        """Stand-in: rank 0 writes Llama.save format (+ tokenizer.model, extra files)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from model import Llama

        inner = _unwrap(model)
        # Collective under FSDP2: every rank takes part in gathering the full (unsharded) weights.
        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if fabric.global_rank == 0:
            directory = Path(directory)
            full = Llama.from_state_dict(inner.config, state, kernels=inner.kernels)
            full.save(directory)
            if tokenizer is not None:
                tmp = directory / f".tokenizer.model.tmp-{os.getpid()}"
                shutil.copyfile(tokenizer, tmp)
                os.replace(tmp, directory / "tokenizer.model")
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, directory / name)
        fabric.barrier()

    def load_model_from_any(path, kernels="auto"):
        """Stand-in: our consolidated directory or an HF Llama directory."""
        from model import Llama
        from model.hf import is_hf_checkpoint, load_hf

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--ckpt {path}: not a directory")
        if is_hf_checkpoint(path):
            return load_hf(path, kernels=kernels)
        return Llama.load(path, kernels=kernels)
