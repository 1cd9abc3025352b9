"""Convert between our consolidated checkpoint (Llama.save) and a Hugging Face Llama directory.

    python scripts/convert_hf.py export --ckpt DIR --out HF_DIR [--tokenizer FILE] [--dtype bf16]
    python scripts/convert_hf.py import --hf HF_DIR --out DIR [--dtype bf16]

The exported directory loads with transformers' AutoModelForCausalLM as the class it was
imported as (LlamaForCausalLM, or MistralForCausalLM), tied or not as it came (and
AutoTokenizer when --tokenizer is given or the checkpoint has a tokenizer.model). `--ckpt`
and `--hf` are resolved as every command resolves a checkpoint (pretrain/checkpoint.py
`resolve_model_dir`); an unsupported architecture, a GGUF or other file is refused (exit 2)
before anything is written.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from model.hf import is_hf_checkpoint, load_hf, save_hf, save_hf_tokenizer
from pretrain.checkpoint import CheckpointError, load_model_from_any, resolve_model_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our checkpoint -> HF directory")
    exp.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory: ours (config.json + "
                     "model.safetensors), a pretraining checkpoint or output directory, or an HF directory")
    exp.add_argument("--out", required=True, type=Path, help="HF directory to write")
    exp.add_argument("--tokenizer", type=Path, help="sentencepiece .model to include "
                     "(default: the checkpoint's tokenizer.model, if any)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the saved dtype)")
    imp = sub.add_parser("import", help="HF Llama/Mistral directory -> our checkpoint")
    imp.add_argument("--hf", required=True, type=Path, help="HF directory (config.json + safetensors or bin)")
    imp.add_argument("--out", required=True, type=Path, help="directory to write our checkpoint to")
    imp.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the stored dtype)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> None:
    args.ckpt = resolve_model_dir(args.ckpt)
    model = load_model_from_any(args.ckpt)
    tokenizer = args.tokenizer or (args.ckpt / "tokenizer.model" if (args.ckpt / "tokenizer.model").is_file() else None)
    bos, eos = 1, 2
    if tokenizer is not None:
        import sentencepiece as spm

        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer} not found")
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        if sp.vocab_size() > model.config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {sp.vocab_size()} pieces but the model's "
                             f"vocab_size is {model.config.vocab_size}")
        bos, eos = sp.bos_id(), sp.eos_id()
    save_hf(model, args.out, dtype=DTYPES.get(args.dtype), bos_id=bos, eos_id=eos)
    if tokenizer is not None:
        template_file = args.ckpt / "chat_template.jinja"
        save_hf_tokenizer(tokenizer, args.out,
                          chat_template=template_file.read_text() if template_file.is_file() else None)
    print(f"exported {args.ckpt} -> {args.out} ({model.num_params():,} parameters)")


def import_(args: argparse.Namespace) -> None:
    hf_dir = resolve_model_dir(args.hf)
    if not is_hf_checkpoint(hf_dir):
        raise ValueError(f"--hf {args.hf}: not a Hugging Face model directory (a config.json naming its "
                         f"architectures); for our own checkpoints use them directly or `export`")
    model = load_hf(hf_dir, dtype=DTYPES.get(args.dtype))
    model.save(args.out)
    if (args.hf / "tokenizer.model").is_file():
        shutil.copyfile(args.hf / "tokenizer.model", args.out / "tokenizer.model")
    print(f"imported {args.hf} -> {args.out} ({model.num_params():,} parameters)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        export(args) if args.command == "export" else import_(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # bad input, as in every CLI of the project
    return 0


if __name__ == "__main__":
    sys.exit(main())
