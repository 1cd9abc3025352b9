"""Train a Llama-style sentencepiece BPE tokenizer on text files.

    python data_prep/train_tokenizer.py --input a.txt [b.txt ...] --model-prefix OUT/tok \
        [--vocab-size 32000] [--character-coverage 0.99995] [--input-sentence-size 0] [--threads N]

Writes OUT/tok.model (and OUT/tok.vocab) with the Llama-2 tokenizer's settings: BPE, byte
fallback (no unknown characters), digits split, whitespace kept as is, unk=0 bos=1 eos=2
and no pad. Meant for small demos and new languages; TinyLlama itself used Llama-2's.
Each line of the input files is one training sentence.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import sentencepiece as spm  # noqa: E402

from data_prep.errors import DataPrepError  # noqa: E402

# Llama-2's trainer_spec (read from its tokenizer.model), minus corpus-specific values.
LLAMA_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, split_by_unicode_script=True,
    split_by_whitespace=True, split_by_number=True, allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16, max_sentence_length=4192, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


def train_tokenizer(inputs: list[str | os.PathLike], model_prefix: str | os.PathLike, vocab_size: int = 32000,
                    character_coverage: float = 0.99995, input_sentence_size: int = 0,
                    num_threads: int | None = None, quiet: bool = True) -> Path:
    """Train and return the path of `<model_prefix>.model`."""
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataPrepError(f"tokenizer training input not found: {', '.join(missing)}")
    if not paths:
        raise DataPrepError("no input text files given")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in paths), model_prefix=str(prefix), vocab_size=vocab_size,
            character_coverage=character_coverage, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0, num_threads=num_threads or (os.cpu_count() or 1),
            minloglevel=2 if quiet else 0, **LLAMA_SETTINGS)
    except RuntimeError as e:  # e.g. "Vocabulary size too high": say which input and setting
        raise DataPrepError(f"sentencepiece could not train on {', '.join(map(str, paths))} with "
                            f"--vocab-size {vocab_size}: {e}") from e
    return prefix.with_name(prefix.name + ".model")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--character-coverage", type=float, default=0.99995)
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="sample this many sentences (0 = use all)")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    args = p.parse_args(argv)
    try:
        model = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.character_coverage,
                                args.input_sentence_size, args.threads, quiet=False)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
