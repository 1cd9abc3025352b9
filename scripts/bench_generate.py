"""Tokens/s of our batched KV-cache generation (finetune/generate.py) against HF `generate`.

    python scripts/bench_generate.py [--config tiny|nano|micro|small|tinyllama-1.1b] [--batch 16]
        [--prompt-len 64] [--new-tokens 128] [--dtype bf16] [--device cuda]

Both decode greedily from the same random-weight model (exported to HF with model.hf.save_hf),
with prompts of different lengths (left padding), EOS disabled so every row produces
--new-tokens tokens. Prints a table; nothing is asserted (DESIGN rule 8).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="nano")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)

    from finetune.generate import generate_batch
    from model import Config, Llama
    from model.hf import save_hf

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = Config.from_name(args.config, vocab_size=args.vocab_size) if args.config != "tiny" \
        else Config.from_name("tiny")
    torch.manual_seed(0)
    model = Llama(config).to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [max(1, args.prompt_len - (i * 7) % max(args.prompt_len // 2, 1)) for i in range(args.batch)]
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    no_eos = -1  # never produced: every row runs the full length

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    generate_batch(model, prompts[:2], 4, no_eos, 0)  # warm-up
    sync()
    t = time.perf_counter()
    out = generate_batch(model, prompts, args.new_tokens, no_eos, 0)
    sync()
    ours = time.perf_counter() - t
    n_tokens = sum(len(o) for o in out)
    rows.append(("finetune.generate (KV cache)", n_tokens / ours))

    if not args.skip_hf:
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_hf(model, d)
            hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=dtype).to(args.device).eval()
        width = max(lengths)
        ids = torch.zeros(args.batch, width, dtype=torch.long)
        mask = torch.zeros(args.batch, width, dtype=torch.long)
        for i, pr in enumerate(prompts):
            ids[i, width - len(pr):] = torch.tensor(pr)
            mask[i, width - len(pr):] = 1
        ids, mask = ids.to(args.device), mask.to(args.device)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
            sync()
            t = time.perf_counter()
            hf_out = hf.generate(ids, attention_mask=mask, **kw)
            sync()
        hf_s = time.perf_counter() - t
        rows.append(("transformers generate", (hf_out.shape[1] - width) * args.batch / hf_s))
        same = sum(hf_out[i, width:].tolist() == out[i] for i in range(args.batch))
        print(f"greedy outputs identical for {same}/{args.batch} rows")

    print(f"\n{args.config}, batch {args.batch}, prompts <= {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"{args.dtype} on {args.device}\n")
    print("| generator | tokens/s |\n|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
