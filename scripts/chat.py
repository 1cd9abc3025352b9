"""A terminal chat with any checkpoint, in the checkpoint's own chat template.

    python scripts/chat.py --ckpt DIR [--system TEXT] [--max-new-tokens N] [--temperature T] [--top-p P]
        [--seed S] [--tokenizer FILE] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16|fp16] [--verbose]

The template is the one SFT and SPIN trained with (chat_template.json beside the weights), or
an HF directory's chat template; a base model with neither gets the project's default
template, and the chat says so. --system puts a system message first (an HF template only;
SmolLM2's writes a default one without it). The conversation so far is the prompt; when it
would not fit the model's context the oldest turns are dropped. Answers appear as they are
generated and end at the template's end-of-turn token (<|im_end|>, <|eot_id|>, EOS) or any
of the tokenizer's EOS ids.

Type a message and press Enter. /reset starts a new conversation, /quit (or Ctrl-D) leaves,
Ctrl-C stops a long answer and keeps the chat going. When stdin is not a terminal, each line
is one message (e.g. `printf 'hi\\nand then?\\n' | python scripts/chat.py --ckpt DIR`) and only
the answers go to stdout. Exit code 2 means bad input (checkpoint, tokenizer, template).
"""
from __future__ import annotations

import argparse
import sys

from finetune.conversation import Conversation, find_chat_format
from finetune.inference import (add_model_and_sampling_args, check_sampling_args, load_for_inference,
                                make_generator, new_token_budget, stream_answer)
from pretrain.checkpoint import CheckpointError

HELP = "/reset starts a new conversation, /quit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_sampling_args(p, 256, "longest answer; the oldest turns are dropped to leave room for it "
                                "(for at most half the context)")
    p.add_argument("--system", help="a system message before the conversation (needs an HF chat template "
                   "that has a system turn)")
    p.add_argument("--verbose", action="store_true", help="print each prompt (text and token ids) and each "
                   "answer's ids to stderr")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    return args


def read_messages(interactive: bool):
    """User lines, from the terminal (with line editing) or from piped stdin."""
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as in a shell
            print(file=sys.stderr)
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_for_inference(args.ckpt, args.tokenizer, device=args.device, dtype=args.dtype)
        fmt = find_chat_format(loaded.directory, loaded.tokenizer)
        if args.system is not None and not fmt.supports_system:
            raise ValueError(f"--system: {fmt.source} is the project's chat template, which has no system turn; "
                             f"a system message needs a checkpoint with an HF chat template")
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok, block = loaded.tokenizer, loaded.model.config.block_size
    conversation = Conversation(fmt, max_prompt_len=block - min(args.max_new_tokens, block // 2),
                                system=args.system)
    generator = make_generator(loaded, args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(); absent on Windows)
        except ImportError:
            pass

    note(f"chat with {loaded.describe()}")
    if fmt.is_default:
        note(f"note: {loaded.directory} has no chat template (no chat_template.json, no HF chat_template): "
             f"using the project's default template; a base model was not trained on it, so expect "
             f"continuations rather than answers")
    else:
        note(f"chat template: {fmt.source}")
    note("answers end at " + ", ".join(f"{tok.id_to_token(i)!r} ({i})" for i in fmt.stop_ids))
    if interactive:
        note(HELP)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        for message in read_messages(interactive):
            command = message.strip()
            if not command:
                continue
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                conversation.reset()
                note("(new conversation)")
                continue
            if command == "/help":
                note(HELP)
                continue
            try:
                prompt_ids, dropped = conversation.prompt(message)
            except ValueError as e:
                note(f"error: {e}")
                continue
            if dropped:
                note(f"(the {dropped} oldest turn(s) no longer fit the context of {block} tokens and were dropped)")
            if args.verbose:
                note(f"[prompt: {len(prompt_ids)} tokens, {len(conversation.turns)} earlier turn(s)]\n"
                     f"{tok.decode(prompt_ids)}\n[prompt ids: {prompt_ids}]")
            budget = new_token_budget(loaded, len(prompt_ids), args.max_new_tokens)
            answer = stream_answer(loaded, prompt_ids, budget, show, temperature=args.temperature,
                                   top_p=args.top_p, generator=generator, stop_ids=fmt.stop_ids)
            show("\n")
            if answer.stop == "interrupted":
                note("(stopped)")
            if args.verbose:
                note(f"[answer ids ({answer.stop}): {answer.ids}]")
            conversation.add(message, answer.text)
    except KeyboardInterrupt:  # between answers (an answer itself catches its own Ctrl-C)
        note("")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
