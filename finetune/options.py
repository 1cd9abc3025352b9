"""The options SFT and SPIN share, on top of the engine's (pretrain/engine.py CommonOptions)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pretrain.engine import CommonOptions
from pretrain.options import opt


@dataclass(kw_only=True)
class FinetuneOptions(CommonOptions):
    ckpt: Path = opt(help="the starting checkpoint: our consolidated directory, a pretraining checkpoint "
                          "or output directory, or an HF Llama directory")
    data: Path = opt(help="UltraChat-format .jsonl or .parquet")
    out: Path = opt(help="output directory (config.yaml, metrics.jsonl, the models)")
    tokenizer: Path | None = opt(None, "a sentencepiece .model, an HF tokenizer.json or a directory holding one; "
                                       "overrides the checkpoint's tokenizer")
    activation_checkpointing: bool = opt(False, "recompute each block in backward: less activation memory, "
                                               "about a third more compute")
    grad_clip: float = opt(1.0, "global grad-norm clip; 0 disables", minimum=0)
    max_skipped_steps: int = opt(10, "stop after this many non-finite steps in a row", minimum=1)
    wandb_project: str | None = opt(None, "also log to this W&B project (offline by default)")
