"""Tokens/s of our batched KV-cache generation (finetune/generate.py) against HF `generate`.

    python scripts/bench_generate.py [--config tiny|nano|micro|small|tinyllama-1.1b] [--batch 16]
        [--prompt-len 64] [--new-tokens 128] [--dtype bf16] [--device cuda] [--hf-cache dynamic,static]

Both decode greedily from the same random-weight model (exported to HF with model.hf.save_hf),
with prompts of different lengths (left padding), EOS disabled so every row produces
--new-tokens tokens. HF runs once per cache kind in --hf-cache ("static" is the pre-allocated
cache that transformers compiles its decoding step for; its compilation happens in an
untimed warm-up of the same shape). Prints a table; nothing is asserted (docs/design.md rule 8).
`measure()` is what scripts/gpu_bench.py calls.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

HF_CACHES = ("dynamic", "static")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(batch: int, prompt_len: int, vocab_size: int) -> list[list[int]]:
    """Prompts of different lengths (so left padding is exercised), fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    lengths = [max(1, prompt_len - (i * 7) % max(prompt_len // 2, 1)) for i in range(batch)]
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def measure(config_name: str = "nano", vocab_size: int = 32000, batch: int = 16, prompt_len: int = 64,
            new_tokens: int = 128, dtype: str = "fp32", device: str = "cpu",
            hf_caches: tuple[str, ...] = ("dynamic",), on_result=None) -> dict:
    """Tokens/s of ours and of HF `generate` for each cache kind, plus how many rows agree.

    Returns {"ours": tokens/s, "hf_<cache>": tokens/s, "hf_<cache>_identical_rows": n, "rows": batch, ...}.
    An HF cache kind that fails (an old transformers without static caches) is recorded as
    "hf_<cache>_error" instead of ending the measurement. `on_result(result)` is called after
    each measurement, so a caller that may be cut short keeps what was measured.
    """
    report = on_result or (lambda r: None)
    from finetune.generate import generate_batch
    from model import Config, Llama
    from model.hf import save_hf

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    config = Config.from_name(config_name) if config_name == "tiny" else \
        Config.from_name(config_name, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = Llama(config).to(device, torch_dtype).eval()
    prompts = _prompts(batch, prompt_len, config.vocab_size)
    no_eos = -1  # never produced: every row runs the full length
    result = dict(config=config_name, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, dtype=dtype,
                  device=device, rows=batch)

    generate_batch(model, prompts, 4, no_eos, 0)  # warm-up: kernels, allocator, full batch width
    _sync(device)
    t = time.perf_counter()
    ours = generate_batch(model, prompts, new_tokens, no_eos, 0)  # the CUDA-graph capture is in the time
    _sync(device)
    result["ours"] = sum(len(o) for o in ours) / (time.perf_counter() - t)
    result["ours_cuda_graph"] = device.startswith("cuda")
    report(result)

    if hf_caches:
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_hf(model, d)
            hf = LlamaForCausalLM.from_pretrained(d).to(device, torch_dtype).eval()
        del model
        width = max(len(p) for p in prompts)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, pr in enumerate(prompts):
            ids[i, width - len(pr):] = torch.tensor(pr)
            mask[i, width - len(pr):] = 1
        ids, mask = ids.to(device), mask.to(device)
        kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        for cache in hf_caches:
            extra = {"cache_implementation": "static"} if cache == "static" else {}
            try:
                with torch.no_grad():
                    # The static cache is sized by the call, so only a call of the full shape warms it up.
                    warm = kw if cache == "static" else {**kw, "max_new_tokens": 4, "min_new_tokens": 4}
                    hf.generate(ids, **warm, **extra)
                    _sync(device)
                    t = time.perf_counter()
                    out = hf.generate(ids, **kw, **extra)
                    _sync(device)
            except Exception as e:  # recorded in the table: one HF mode failing must not hide the others
                result[f"hf_{cache}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                report(result)
                continue
            result[f"hf_{cache}"] = (out.shape[1] - width) * batch / (time.perf_counter() - t)
            result[f"hf_{cache}_identical_rows"] = sum(out[i, width:].tolist() == ours[i] for i in range(batch))
            report(result)
    return result


def format_table(r: dict) -> str:
    lines = [f"{r['config']}, batch {r['batch']}, prompts <= {r['prompt_len']} tokens, {r['new_tokens']} new tokens, "
             f"{r['dtype']} on {r['device']}", "", "| generator | tokens/s | vs ours | greedy rows identical |",
             "|---|---|---|---|", f"| finetune.generate (KV cache) | {r['ours']:,.0f} | 1.00x | - |"]
    for cache in HF_CACHES:
        if f"hf_{cache}" in r:
            lines.append(f"| transformers generate, {cache} cache | {r[f'hf_{cache}']:,.0f} | "
                         f"{r[f'hf_{cache}'] / r['ours']:.2f}x | {r[f'hf_{cache}_identical_rows']}/{r['rows']} |")
        elif f"hf_{cache}_error" in r:
            lines.append(f"| transformers generate, {cache} cache | error: {r[f'hf_{cache}_error']} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="nano")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hf-cache", default="dynamic",
                   help=f"comma-separated HF cache kinds to compare against ({','.join(HF_CACHES)})")
    p.add_argument("--skip-hf", action="store_true", help="time ours only")
    p.add_argument("--json", type=Path, help="write the figures here (rewritten after each measurement)")
    args = p.parse_args(argv)
    caches = () if args.skip_hf else tuple(c.strip() for c in args.hf_cache.split(",") if c.strip())
    unknown = sorted(set(caches) - set(HF_CACHES))
    if unknown:
        p.error(f"--hf-cache: unknown {unknown}; choose from {','.join(HF_CACHES)}")
    def write_json(result: dict) -> None:
        if args.json:
            tmp = args.json.with_name(f".{args.json.name}.tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, args.json)

    r = measure(args.config, args.vocab_size, args.batch, args.prompt_len, args.new_tokens, args.dtype, args.device,
                caches, on_result=write_json)
    print(format_table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
