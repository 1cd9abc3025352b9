"""Turn a training checkpoint into the consolidated Llama.save format.

    python pretrain/consolidate.py --ckpt OUT/checkpoints/step-000100 --out DIR [--dtype bf16]

`--ckpt` may also be a training output directory (its newest complete checkpoint is used).
The result (config.json + model.safetensors + the tokenizer's files when the run had one) is what
finetune/ and scripts/convert_hf.py read. Runs on one CPU process, without a process group:
the distributed checkpoint is read with all its shards, whatever the training world size was.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data_prep.tokenizer import tokenizer_file
from pretrain.checkpoint import (CheckpointError, find_latest, is_training_checkpoint, read_training_checkpoint_model,
                                 write_consolidated)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: Path) -> Path:
    if is_training_checkpoint(path):
        return path
    for root in (path / "checkpoints", path):
        latest, _ = find_latest(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"--ckpt {path}: not a complete training checkpoint (step-NNNNNN with COMPLETE, "
                          f"state/ and config.json) nor an output directory holding one")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="training checkpoint dir (or a pretraining --out dir)")
    p.add_argument("--out", required=True, help="directory to write config.json + model.safetensors into")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the saved weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer to include (a .model, a tokenizer.json or a "
                   "directory holding one); default: the checkpoint's")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(Path(args.ckpt))
        model = read_training_checkpoint_model(ckpt, kernels="torch").to(DTYPES[args.dtype])
        tokenizer = args.tokenizer or (ckpt if tokenizer_file(ckpt) is not None else None)
        if tokenizer is not None and tokenizer_file(tokenizer) is None:
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file")
        out = write_consolidated(model, args.out, tokenizer=tokenizer)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({model.config.name}, {model.num_params():,} parameters, {args.dtype}) from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
