"""Convert between our consolidated checkpoint (Llama.save) and a Hugging Face Llama directory.

    python scripts/convert_hf.py export --ckpt DIR --out HF_DIR [--tokenizer FILE] [--dtype bf16]
    python scripts/convert_hf.py import --hf HF_DIR --out DIR [--dtype bf16]

The exported directory loads with transformers' AutoModelForCausalLM as the class it was
imported as (LlamaForCausalLM, or MistralForCausalLM), tied or not as it came (and
AutoTokenizer when --tokenizer is given or the checkpoint has a tokenizer). The tokenizer keeps
its kind: a sentencepiece tokenizer.model, or an HF tokenizer.json with its tokenizer_config.json
and special_tokens_map.json; the checkpoint's chat template goes into tokenizer_config.json and
generation_config.json's eos_token_id lists every id generation stops on (the tokenizer's EOS
ids and the template's end-of-turn token). Import copies the HF directory's tokenizer files
(and chat_template.jinja) beside the weights. `--ckpt` and `--hf` are resolved as every command
resolves a checkpoint (pretrain/checkpoint.py `resolve_model_dir`); an unsupported architecture,
a GGUF or other file, a tokenizer with more ids than the embedding has rows and a chat template
with no generation prompt are refused (exit 2) before anything is written.
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
    exp.add_argument("--tokenizer", type=Path, help="tokenizer to include: a sentencepiece .model, an HF "
                     "tokenizer.json or a directory holding one (default: the checkpoint's, if any)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the saved dtype)")
    imp = sub.add_parser("import", help="HF Llama/Mistral directory -> our checkpoint")
    imp.add_argument("--hf", required=True, type=Path, help="HF directory (config.json + safetensors or bin)")
    imp.add_argument("--out", required=True, type=Path, help="directory to write our checkpoint to")
    imp.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the stored dtype)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> None:
    from data_prep.tokenizer import load_tokenizer, tokenizer_file

    args.ckpt = resolve_model_dir(args.ckpt)
    model = load_model_from_any(args.ckpt)
    tok, template_text, stops = None, None, None
    if args.tokenizer is not None or tokenizer_file(args.ckpt) is not None:
        tok = load_tokenizer(args.ckpt, args.tokenizer, model_vocab_size=model.config.vocab_size)
        template_text, stops = chat_template_and_stops(args.ckpt, tok)
    # every check above, before the first file is written
    bos, eos = (1, 2) if tok is None else (tok.bos_id, tok.eos_id)
    save_hf(model, args.out, dtype=DTYPES.get(args.dtype), bos_id=bos, eos_id=eos)
    if tok is not None:
        save_hf_tokenizer(tok, args.out, chat_template=template_text, stop_ids=stops)
    print(f"exported {args.ckpt} -> {args.out} ({model.num_params():,} parameters)")


def chat_template_and_stops(ckpt: Path, tok) -> tuple[str | None, list[int]]:
    """The Jinja text of `ckpt`'s chat template (None without one) and the ids generation stops
    on: the tokenizer's, and the template's end-of-turn token. A template chat, SFT and SPIN
    would refuse (no generation prompt, ...) is refused here too."""
    from finetune.chat import JINJA_FILE, ChatTemplate
    from finetune.conversation import find_chat_format, load_chat_template

    template = load_chat_template(ckpt)
    if template is None:
        return None, list(tok.stop_ids)
    stops = list(find_chat_format(ckpt, tok).stop_ids)
    if isinstance(template, ChatTemplate):  # ours, as the Jinja SFT saved beside it
        jinja = ckpt / JINJA_FILE
        return (jinja.read_text() if jinja.is_file() else template.jinja(tok.adds_prefix_space)), stops
    return template.text, stops


def import_(args: argparse.Namespace) -> None:
    from data_prep.tokenizer import load_tokenizer, tokenizer_file, tokenizer_files

    hf_dir = resolve_model_dir(args.hf)
    if not is_hf_checkpoint(hf_dir):
        raise ValueError(f"--hf {args.hf}: not a Hugging Face model directory (a config.json naming its "
                         f"architectures); for our own checkpoints use them directly or `export`")
    model = load_hf(hf_dir, dtype=DTYPES.get(args.dtype))
    if tokenizer_file(hf_dir) is not None:  # what every command would refuse, refused before writing
        chat_template_and_stops(hf_dir, load_tokenizer(hf_dir, model_vocab_size=model.config.vocab_size))
    model.save(args.out)
    for name, path in tokenizer_files(hf_dir).items():
        shutil.copyfile(path, args.out / name)
    if (hf_dir / "chat_template.jinja").is_file():
        shutil.copyfile(hf_dir / "chat_template.jinja", args.out / "chat_template.jinja")
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
