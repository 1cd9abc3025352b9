"""Plain text completion from any checkpoint, printed as it is generated.

    python scripts/generate.py --ckpt DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
        [--top-p P] [--seed S] [--tokenizer FILE] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16|fp16]

--ckpt is anything the project reads: our consolidated directory (finetune/pretrain output
final/), a pretraining checkpoint (step-NNNNNN) or output directory, or an HF Llama directory.
The tokenizer is the checkpoint's (tokenizer.json or tokenizer.model) unless --tokenizer is
given. The prompt is encoded as the tokenizer does a text (BOS + text where it adds a BOS;
no chat template: scripts/chat.py is for chatting) and printed, followed by the continuation
as it is produced, until EOS or another of generation_config.json's eos_token_id;
--temperature 0 is greedy decoding. The GPU is used when there is one. Exit code 2 means bad input (a missing checkpoint or tokenizer, a
tokenizer that does not fit the model, a prompt longer than the context).
"""
from __future__ import annotations

import argparse
import sys

from finetune.inference import (add_model_and_sampling_args, check_sampling_args, load_for_inference,
                                make_generator, new_token_budget, stream_answer)
from pretrain.checkpoint import CheckpointError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_sampling_args(p, 200, "at most this many new tokens (fewer when the prompt leaves "
                                "less room in the model's context)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--verbose", action="store_true", help="print the model, the prompt's and the generated "
                   "token ids to stderr")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_for_inference(args.ckpt, args.tokenizer, device=args.device, dtype=args.dtype)
        tok = loaded.tokenizer
        prompt_ids = tok.prefix_ids + tok.encode(args.prompt)
        if not prompt_ids:
            raise ValueError("--prompt is empty and the tokenizer adds no BOS: there is nothing to continue")
        budget = new_token_budget(loaded, len(prompt_ids), args.max_new_tokens)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"model: {loaded.describe()}\nprompt ids ({len(prompt_ids)}): {prompt_ids}", file=sys.stderr)
    if budget < args.max_new_tokens:
        print(f"note: generating at most {budget} tokens: the prompt's {len(prompt_ids)} tokens leave no more "
              f"room in the model's context of {loaded.model.config.block_size}", file=sys.stderr)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    show(args.prompt)
    answer = stream_answer(loaded, prompt_ids, budget, show, temperature=args.temperature, top_p=args.top_p,
                           generator=make_generator(loaded, args.seed), context=prompt_ids[-8:])
    show("\n")
    if args.verbose:
        print(f"generated ids ({len(answer.ids)}, stopped by {answer.stop}): {answer.ids}", file=sys.stderr)
    return 130 if answer.stop == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
