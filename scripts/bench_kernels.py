"""Benchmark the fused Triton kernels against PyTorch eager, torch.compile and Liger-Kernel.

For each kernel on TinyLlama shapes (tokens 8x2048 and 16x2048, d=2048, 32/4 heads of 64,
ffn 5632, vocab 32000), bf16, it times forward+backward and forward alone (median of
`triton.testing.do_bench`), converts each time to GB/s from an explicit count of the bytes
the operation must move (each input read once, each output written once), and records the
peak extra memory of one forward+backward. The device's copy
bandwidth (a large tensor copy) is measured first so the table can show "% of copy";
fused linear+CE is matmul-bound, so it reports TFLOP/s instead.

    python scripts/bench_kernels.py                       # table on stdout
    python scripts/bench_kernels.py --json bench.json     # also write the rows as JSON
    python scripts/bench_kernels.py --smoke               # tiny shapes (on CPU: Triton interpreter),
                                                          # to check the script itself

Targets (issue): RMSNorm/RoPE/SwiGLU >= 80% of copy bandwidth and no slower than
torch.compile or Liger; cross-entropy no slower than torch.compile; fused linear+CE peak
memory <= 1/4 of lm_head + F.cross_entropy at 16x2048 tokens and time within 10% of it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

TINYLLAMA = dict(seq=2048, d=2048, n_head=32, n_kv_head=4, head_dim=64, ffn=5632, vocab=32000)
SMOKE = dict(seq=8, d=64, n_head=4, n_kv_head=2, head_dim=16, ffn=176, vocab=512)
KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")


@dataclass
class Case:
    """One kernel at one shape: how to build inputs, what must move, and the competitors."""
    kernel: str
    tokens: int
    make: callable  # () -> (args tuple, leaf tensors needing grad, output gradients or None)
    bytes_moved: int = 0  # forward + backward; 0: not memory-bound (report TFLOP/s instead)
    flops: int = 0
    fwd_bytes: int = 0    # the forward alone
    fwd_flops: int = 0
    impls: dict = field(default_factory=dict)


def _rand(*shape, dtype, device, grad=True, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)


def build_cases(kernels, batches, shapes, dtype, device, use_compile: bool) -> list[Case]:
    """The cases for every requested batch size; impls missing here (no Liger) are skipped."""
    liger = _liger()
    compiled = {}

    def compile_ref(name, fn):
        if not use_compile:
            return None
        if name not in compiled:
            compiled[name] = torch.compile(fn)
        return compiled[name]

    es = torch.empty((), dtype=dtype).element_size()
    s = shapes
    cases = []
    for B in batches:
        N, T = B * s["seq"], s["seq"]
        d, F_, V, D, hq, hk = s["d"], s["ffn"], s["vocab"], s["head_dim"], s["n_head"], s["n_kv_head"]

        def rms_inputs():
            x, w = _rand(B, T, d, dtype=dtype, device=device), _rand(d, dtype=dtype, device=device)
            return (x, w, 1e-5), (x, w), _rand(B, T, d, dtype=dtype, device=device, grad=False)

        def rope_inputs():
            # q/k are strided views of one fused qkv projection, as in the model.
            qkv = _rand(B, T, hq + 2 * hk, D, dtype=dtype, device=device, grad=False)
            q, k = qkv[:, :, :hq].requires_grad_(), qkv[:, :, hq:hq + hk].requires_grad_()
            angles = torch.arange(T, device=device)[:, None] * torch.rand(D // 2, device=device)
            angles = torch.cat((angles, angles), -1)
            dq = _rand(B, T, hq, D, dtype=dtype, device=device, grad=False)
            dk = _rand(B, T, hk, D, dtype=dtype, device=device, grad=False)
            return (q, k, angles.cos(), angles.sin()), (q, k), (dq, dk)

        def swiglu_inputs():
            h = _rand(B, T, 2 * F_, dtype=dtype, device=device, grad=False)
            gate, up = (t.requires_grad_() for t in h.chunk(2, -1))  # strided halves, as in the model
            return (gate, up), (gate, up), _rand(B, T, F_, dtype=dtype, device=device, grad=False)

        def ce_inputs():
            logits = _rand(N, V, dtype=dtype, device=device, scale=2.0)
            return (logits, torch.randint(0, V, (N,), device=device)), (logits,), None

        def flce_inputs():
            hidden = _rand(N, d, dtype=dtype, device=device)
            weight = _rand(V, d, dtype=dtype, device=device, scale=d ** -0.5)
            return (hidden, weight, torch.randint(0, V, (N,), device=device)), (hidden, weight), None

        import kernels as K
        table = {
            # forward: read x, write y (+ fp32 rstd); backward: read x and dy, write dx.
            "rms_norm": Case("rms_norm", N, rms_inputs, bytes_moved=5 * N * d * es + 4 * N * 4,
                             fwd_bytes=2 * N * d * es + 4 * N, impls={
                "triton": K.rms_norm, "eager": K.rms_norm_reference,
                "compile": compile_ref("rms_norm", K.rms_norm_reference),
                "liger": liger and (lambda x, w, eps: liger.liger_rms_norm(x, w, eps))}),
            "rope": Case("rope", N, rope_inputs, bytes_moved=4 * N * (hq + hk) * D * es + 4 * T * D * 4,
                         fwd_bytes=2 * N * (hq + hk) * D * es + 2 * T * D * 4, impls={
                "triton": K.apply_rope, "eager": K.apply_rope_reference,
                "compile": compile_ref("rope", K.apply_rope_reference),
                "liger": liger and _liger_rope(liger)}),
            # forward: read gate and up, write out; backward: read gate, up, dy, write both grads.
            "swiglu": Case("swiglu", N, swiglu_inputs, bytes_moved=8 * N * F_ * es, fwd_bytes=3 * N * F_ * es, impls={
                "triton": K.swiglu, "eager": K.swiglu_reference,
                "compile": compile_ref("swiglu", K.swiglu_reference),
                "liger": liger and (lambda g, u: liger.liger_swiglu(g, u))}),
            "cross_entropy": Case("cross_entropy", N, ce_inputs, bytes_moved=3 * N * V * es, fwd_bytes=N * V * es, impls={
                "triton": K.cross_entropy, "eager": K.cross_entropy_reference,
                "F.cross_entropy": lambda x, t: F.cross_entropy(x, t),
                "compile": compile_ref("cross_entropy", K.cross_entropy_reference),
                "liger": liger and (lambda x, t: _first(liger.liger_cross_entropy(x, t)))}),
            "fused_linear_cross_entropy": Case("fused_linear_cross_entropy", N, flce_inputs, flops=6 * N * d * V,
                                               fwd_flops=2 * N * d * V, impls={
                "triton": K.fused_linear_cross_entropy,
                "F.cross_entropy": lambda h, w, t: F.cross_entropy(h @ w.t(), t),  # lm_head + CE baseline
                "eager": K.fused_linear_cross_entropy_reference,
                "compile": compile_ref("fused_linear_cross_entropy", K.fused_linear_cross_entropy_reference),
                "liger": liger and (lambda h, w, t: _first(liger.liger_fused_linear_cross_entropy(h, w, t)))}),
        }
        cases += [table[k] for k in kernels]
    return cases


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _liger():
    try:
        from liger_kernel.transformers import functional
    except Exception:  # not installed, or installed without a usable triton
        return None
    return functional


def _liger_rope(liger):
    # Liger's RoPE takes (B, H, T, D) and (1, T, D) tables; hand it that layout (views, no copy).
    def run(q, k, cos, sin):
        q_out, k_out = liger.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return run


def fwd_bwd(fn, args, out_grads):
    out = fn(*args)
    if isinstance(out, tuple):
        torch.autograd.backward(out, out_grads)
    else:
        out.backward(out_grads)


def time_ms(step, leaves, device, rep: int) -> float:
    """Median milliseconds of one call of `step` (gradients reset between calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(step, warmup=25, rep=rep, grad_to_none=list(leaves), return_mode="median")
    times = []
    for _ in range(3):  # --smoke on CPU: a few wall-clock runs are enough to check the wiring
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mb(step, leaves, device) -> float | None:
    """Peak memory above what was allocated before one forward+backward (inputs excluded)."""
    if device.type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbs(device, n_bytes: int, rep: int) -> float:
    """Device copy bandwidth: bytes read + written by a large tensor copy, per second."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), (), device, rep)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def run_case(case: Case, device, rep: int, copy_gbs: float) -> list[dict]:
    rows = []
    for name, fn in case.impls.items():
        if fn is None:
            continue
        row = dict(kernel=case.kernel, tokens=case.tokens, impl=name)
        try:
            args, leaves, out_grads = case.make()
            step = functools.partial(fwd_bwd, fn, args, out_grads)
            step()  # warm up: compile, autotune, allocator
            row["ms"] = time_ms(step, leaves, device, rep)
            row["peak_mb"] = peak_extra_mb(step, leaves, device)
            # The forward alone, as training runs it (grad mode on, the graph dropped at once).
            row["fwd_ms"] = time_ms(functools.partial(fn, *args), (), device, rep)
            if case.bytes_moved:
                row["gbs"] = case.bytes_moved / (row["ms"] * 1e-3) / 1e9
                row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                row["fwd_gbs"] = case.fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
                row["fwd_pct_copy"] = 100 * row["fwd_gbs"] / copy_gbs
            if case.flops:
                row["tflops"] = case.flops / (row["ms"] * 1e-3) / 1e12
                row["fwd_tflops"] = case.fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
        except Exception as e:  # one failing competitor (e.g. a Liger API change) must not end the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        rows.append(row)
        del args, leaves, out_grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    cols = (("ms", 9, ".3f"), ("gbs", 7, ".0f"), ("pct_copy", 6, ".1f"), ("tflops", 8, ".1f"), ("peak_mb", 8, ".0f"),
            ("fwd_ms", 9, ".3f"), ("fwd_gbs", 7, ".0f"), ("fwd_pct_copy", 6, ".1f"), ("fwd_tflops", 8, ".1f"))
    labels = ("ms", "GB/s", "%copy", "TFLOP/s", "peak MB", "fwd ms", "fwd GB/s", "%copy", "TFLOP/s")
    head = f"{'kernel':<27} {'tokens':>6} {'impl':<16}" + "".join(
        f" {label:>{w}}" for label, (_, w, _) in zip(labels, cols))
    lines = [head]
    for r in rows:
        line = f"{r['kernel']:<27} {r['tokens']:>6} {r['impl']:<16}"
        if "error" in r:
            lines.append(f"{line} error: {r['error']}")
            continue
        for key, width, fmt in cols:
            v = r.get(key)
            line += f" {'-' if v is None else format(v, fmt):>{width}}"
        lines.append(line)
    return "\n".join(lines)


def summarize(rows: list[dict]) -> list[str]:
    """Triton against the targets: % of copy bandwidth, speed vs the others, FLCE memory."""
    by = {(r["kernel"], r["tokens"], r["impl"]): r for r in rows if "error" not in r}
    out = []
    for (kernel, tokens, impl), r in by.items():
        if impl != "triton":
            continue
        parts = [f"{kernel} @ {tokens} tokens:"]
        if "pct_copy" in r:
            parts.append(f"{r['pct_copy']:.0f}% of copy BW")
        for other in ("compile", "liger", "F.cross_entropy"):
            o = by.get((kernel, tokens, other))
            if o:
                parts.append(f"speedup vs {other} {o['ms'] / r['ms']:.2f}x")
        base = by.get((kernel, tokens, "F.cross_entropy"))
        if kernel == "fused_linear_cross_entropy" and base and r.get("peak_mb") and base.get("peak_mb"):
            parts.append(f"peak memory {r['peak_mb'] / base['peak_mb']:.2f}x of lm_head + F.cross_entropy")
        out.append(" ".join(parts))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--batches", default="8,16", help="batch sizes (sequences of 2048 tokens), comma-separated")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time per case, ms")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile competitor")
    p.add_argument("--json", type=Path, help="also write the rows (and the copy bandwidth) here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, no torch.compile (on CPU: the Triton interpreter): checks the script")
    args = p.parse_args(argv)
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(args.kernels) - set(KERNELS))
    if unknown:
        p.error(f"--kernels: unknown {unknown}; choose from {','.join(KERNELS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/triton are imported
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shapes, use_compile, batches, args.rep = SMOKE, False, [2], min(args.rep, 20)
    else:
        if not torch.cuda.is_available():
            print("bench_kernels.py: no CUDA device found; the Triton kernels are benchmarked on a GPU. "
                  "Run it on a machine with one (or use --smoke to check the script on CPU).", file=sys.stderr)
            return 2
        device, shapes, use_compile, batches = torch.device("cuda"), TINYLLAMA, not args.no_compile, args.batches
    import kernels  # noqa: F401  (after TRITON_INTERPRET is settled)

    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device, 2**30 if device.type == "cuda" else 2**24, args.rep)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; copy bandwidth {copy_gbs:.0f} GB/s (read + write of a "
          f"{'1 GiB' if device.type == 'cuda' else '16 MiB'} copy); bf16, forward + backward")
    if _liger() is None:
        print("Liger-Kernel not installed: its column is skipped")

    rows = []
    for case in build_cases(args.kernels, batches, shapes, torch.bfloat16, device, use_compile):
        rows += run_case(case, device, args.rep, copy_gbs)
    print(format_table(rows))
    print("\n".join(summarize(rows)))
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, copy_gbs=copy_gbs, rows=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
