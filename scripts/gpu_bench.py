"""Every GPU figure the project reports, from one command that fits a borrowed GPU for minutes.

    python scripts/gpu_bench.py --out DIR                # one GPU: TinyLlama-1.1B, about 8 minutes
    python scripts/gpu_bench.py --out DIR --smoke        # every path on CPU with tiny shapes (~1-2 min)

Nothing is downloaded: the token shards are synthetic (random ids, two sources mixed 7:3)
and the models have random weights. Four sections (--sections picks some, --train-settings
some rows of the first, so that each call stays under 8 minutes), each bounded by the time
budget (--budget-s; a setting that would not finish in time is recorded as skipped, never
run half-way without saying so), each written to DIR/gpu_bench.json as soon as it ends:

1. train: `pretrain/tinyllama.py` itself, one process per setting: first the real recipe,
   gradient accumulation at micro-batch 8 x 4 and 16 x 2 per step with --fsdp-mode shard and
   keep; then micro-batch 4, 8 and 16 x 2048 tokens with the global batch equal to the
   micro-batch, with and without activation checkpointing and --compile, and --no-save.
   Per setting: tokens/s (median of the steps after the warm-up), MFU in the project's
   convention (6·N_non-embedding + 12·L·d·T FLOPs per token) and in TinyLlama's (6·N),
   peak allocated and reserved memory, graph breaks (--compile), the attention kernel the
   run measured and ran, and for the profiled setting (--profile) the GPU's busy share of
   the step; out of memory is a result, not a failure.
2. hf: transformers' LlamaForCausalLM on the same config and shards at micro-batch 8 x 4,
   plain, compiled, with Liger-Kernel's patches and with both (`scripts/bench_hf_train.py`);
   Liger rows are skipped, with the reason, where Liger-Kernel is not installed.
3. generate (SPIN's workload): our batched KV-cache decoding against transformers'
   `generate` with a dynamic and a static cache, batch 64 x 256 new tokens, bf16
   (`scripts/bench_generate.py` in a child process).
4. kernels: `scripts/bench_kernels.py`'s cases (RMSNorm, RoPE, SwiGLU, cross-entropy, fused
   linear + cross-entropy; forward and backward) as GB/s against the measured copy
   bandwidth, beside eager PyTorch, torch.compile and Liger-Kernel when it is importable.

FP8: `--fp8` at micro-batch 8 x 4 compiled, beside the same bf16 setting (speed and losses);
the loss after 50 steps comes from a separate call of just those two rows with
`--measure-steps 48 --train-settings mb8x4-compile-fp8,mb8x4-compile` (docs/benchmarks.md).

It writes DIR/gpu_bench.json (everything), DIR/gpu_bench.md (the tables, with the targets)
and DIR/train_logs.txt (each training process's output), and prints the tables. Figures
are reported, never asserted (docs/design.md rule 8); docs/benchmarks.md records them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .` (e.g. a borrowed GPU)
SECTIONS = ("train", "hf", "generate", "kernels")

# Targets from issue 26 and docs/design.md; reported beside the figures, never asserted.
TARGETS = {
    "mfu": 0.60,                # bf16, the best setting (project convention, 6N' + attention)
    "mfu_mb8_accum": 0.58,      # bf16, micro-batch 8 with gradient accumulation
    "vs_hf_liger": 1.3,         # our tokens/s over transformers + Liger-Kernel, same GPU, same run
    "fp8_speedup": 1.15,        # --fp8 over bf16 tokens/s at the same setting
    "fp8_loss_rel": 0.01,       # FP8 loss after 50 steps within 1% of bf16's
    "mb8_memory_gb": 40.0,      # micro-batch 8 x 2048, accumulation, no checkpointing: reserved
    "kernel_pct_copy": 80.0,    # element-wise kernels vs the device's copy bandwidth
    "flce_memory_ratio": 0.25,  # fused linear + CE vs lm_head + F.cross_entropy
    "generate_speedup": 2.0,    # our generation vs transformers' compiled static-cache generate
}


@dataclass(frozen=True)
class TrainSetting:
    micro_batch: int
    activation_checkpointing: bool = False
    compile: bool = False
    document_mask: bool = False
    accumulation: int = 1      # micro-batches per optimizer step
    fsdp_mode: str = "shard"   # pretrain/tinyllama.py --fsdp-mode
    fp8: bool = False          # --fp8 (torchao float8 block linears; the smoke run emulates it on CPU)

    @property
    def name(self) -> str:
        return f"mb{self.micro_batch}" + (f"x{self.accumulation}" if self.accumulation > 1 else "") + \
            ("-keep" if self.fsdp_mode == "keep" else "") + ("-ac" if self.activation_checkpointing else "") + \
            ("-compile" if self.compile else "") + ("-docmask" if self.document_mask else "") + \
            ("-fp8" if self.fp8 else "")


def train_settings(micro_batches: list[int], smoke: bool) -> list[TrainSetting]:
    """The grid in the order it is run, most informative first, so a short budget cuts the tail.

    First the real recipe: gradient accumulation (micro-batch 8 x 4 and 16 x 2 per step: a
    global batch of 32 sequences), with --fsdp-mode shard and keep; then global batch =
    micro-batch (the first round's rows), attention within documents once at the middle size,
    compile and checkpointing. The smoke grid covers every path at the two smallest
    micro-batches instead of the whole product.
    """
    if smoke:
        a, b = micro_batches[0], micro_batches[-1]
        return [TrainSetting(a), TrainSetting(b, True), TrainSetting(a, False, True), TrainSetting(b, True, True),
                TrainSetting(b, document_mask=True), TrainSetting(a, accumulation=2),
                TrainSetting(b, accumulation=2, fsdp_mode="keep"), TrainSetting(a, accumulation=2, fp8=True)]
    accumulated = [TrainSetting(mb, accumulation=32 // mb, fsdp_mode=mode) for mode in ("shard", "keep")
                   for mb in (8, 16)]
    # FP8 against bf16 at the same compiled setting (torchao's casts want compiled blocks)
    fp8 = [TrainSetting(8, compile=True, accumulation=4, fp8=True), TrainSetting(8, compile=True, accumulation=4)]
    grid = [TrainSetting(mb, ac, c) for c in (False, True) for ac in (False, True) for mb in micro_batches]
    middle = micro_batches[len(micro_batches) // 2]

    def priority(s: TrainSetting):
        # eager first (the default), then compile, then checkpointing; the middle size first in each.
        return (s.compile and s.activation_checkpointing, s.activation_checkpointing and not s.compile,
                s.compile, s.micro_batch != middle, s.micro_batch)
    ordered = sorted(grid, key=priority)
    return accumulated + fp8 + ordered[:len(micro_batches)] + [TrainSetting(middle, document_mask=True)] + \
        ordered[len(micro_batches):]


def make_shards(root: Path, vocab_size: int, tokens_per_source: int, seed: int = 0,
                mean_doc_tokens: int = 1000) -> list[str]:
    """Two synthetic sources of random token ids, in data_prep's shard format; returns --data values.

    EOS (id 2) ends documents of geometric lengths averaging `mean_doc_tokens` (SlimPajama's
    documents average about 1,000 tokens), which is what attention within documents sees.
    """
    from data_prep.shards import write_shard

    rng = np.random.default_rng(seed)
    specs = []
    for name, weight in (("slimpajama", 0.7), ("starcoder", 0.3)):
        directory = root / name / "train"
        directory.mkdir(parents=True, exist_ok=True)
        for shard in range(2):
            tokens = rng.integers(3, vocab_size, tokens_per_source // 2, dtype=np.int64)
            tokens[rng.random(tokens.size) < 1 / mean_doc_tokens] = 2
            write_shard(directory / f"{name}_{shard:05d}.bin", tokens, vocab_size=vocab_size, eos_id=2,
                        num_docs=int((tokens == 2).sum()))
        specs.append(f"{directory}:{weight}")
    return specs


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, combined output, seconds). A timed-out child is killed with
    its whole process group (its data-loader workers included)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return code, out or "", time.perf_counter() - start


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_train_setting(setting: TrainSetting, opts, data: list[str], work: Path, deadline: float,
                      log) -> dict:
    from model import Config

    config = Config.from_name(opts.config, **({"block_size": opts.block_size} if opts.block_size else {}))
    out = work / setting.name
    steps = opts.warmup_steps + opts.measure_steps
    cmd = [sys.executable, str(ROOT / "pretrain" / "tinyllama.py"), "--config", opts.config,
           "--data", *data, "--out", str(out), "--max-steps", str(steps),
           "--global-batch-size", str(setting.micro_batch * setting.accumulation),
           "--micro-batch-size", str(setting.micro_batch), "--fsdp-mode", setting.fsdp_mode,
           "--warmup-steps", "1", "--log-every", "1", "--val-batches", "0", "--wandb-mode", "disabled",
           "--no-save", "--num-workers", "2", "--seed", "0"]
    if opts.block_size:
        cmd += ["--block-size", str(opts.block_size)]
    if setting.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    if setting.compile:
        cmd.append("--compile")
    if setting.document_mask:
        cmd.append("--document-mask")
    if setting.fp8:
        cmd += ["--fp8"] + (["--debug-fp8-emulate"] if opts.smoke else [])
    profiled = setting.name in opts.profile
    if profiled:  # one step more, profiled and left out of the median; its op table goes to the log
        cmd[cmd.index("--max-steps") + 1] = str(steps + 1)
        cmd += ["--profile-step", str(steps + 1)]
    row = dict(setting=setting.name, **asdict(setting),
               tokens_per_step=setting.micro_batch * setting.accumulation * config.block_size)
    code, text, seconds = run_child(cmd, deadline - time.perf_counter())
    log(f"===== {setting.name}: exit {code}, {seconds:.1f} s\n$ {' '.join(cmd)}\n{text[-16000:]}\n")
    row["wall_s"] = round(seconds, 1)
    row.update(log_facts(text))
    if code is None:
        row["status"] = "cut (time budget)"
    elif "OutOfMemoryError" in text or "CUDA out of memory" in text:
        row["status"] = "out of memory"
    elif code != 0:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        row["status"] = "error"
        row["error"] = lines[-1][:300] if lines else f"exit code {code}"
    else:
        row["status"] = "ok"
    metrics_file = out / "metrics.jsonl"
    records = [json.loads(ln) for ln in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    steps_logged = [r for r in records if "tokens_per_sec" in r]
    measured = [r for r in steps_logged if opts.warmup_steps < r["step"] <= steps]
    if measured:
        tps = _median([r["tokens_per_sec"] for r in measured])
        mfu = _median([r.get("mfu") for r in measured])
        row.update(tokens_per_s=tps, step_s=row["tokens_per_step"] / tps, measured_steps=len(measured),
                   mfu=mfu, mfu_6n=(mfu * 6 * config.num_params / config.flops_per_token(config.block_size)
                                    if mfu is not None else None),
                   peak_alloc_gb=max(r["peak_memory_gb"] for r in steps_logged),
                   peak_reserved_gb=_max_or_none([r.get("peak_reserved_gb") for r in steps_logged]),
                   data_wait_share=_median([r.get("data_wait_share") for r in measured]),
                   first_step_s=row["tokens_per_step"] / steps_logged[0]["tokens_per_sec"],
                   loss_first=steps_logged[0]["loss"], loss_last=steps_logged[-1]["loss"],
                   graph_breaks=steps_logged[-1].get("graph_breaks"))
    elif row["status"] == "ok":
        row["status"] = "error"
        row["error"] = f"no step after the {opts.warmup_steps} warm-up steps in {metrics_file}"
    return row


def log_facts(text: str) -> dict:
    """What the training log says beyond metrics.jsonl: the attention kernel that ran and, for a
    profiled setting, the GPU's busy share of the profiled step."""
    import re

    facts = {}
    kernel = re.search(r"backends: attention ([^,\s]+)", text)
    if kernel:
        facts["attention_kernel"] = kernel.group(1)
    busy = re.search(r"profile: GPU busy ([\d.]+) ms of the ([\d.]+) ms step", text)
    if busy:
        facts["gpu_busy_share"] = float(busy.group(1)) / float(busy.group(2))
    return facts


def _max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def section_train(opts, work: Path, deadline: float, log) -> dict:
    from model import Config

    config = Config.from_name(opts.config, **({"block_size": opts.block_size} if opts.block_size else {}))
    # Enough tokens that no window repeats within a setting's steps (the sampler reads windows).
    need = max(opts.micro_batches) * (config.block_size + 1) * (opts.warmup_steps + opts.measure_steps)
    # Smoke windows are 129 tokens: shorter documents, so a window holds several.
    data = make_shards(work / "data", config.vocab_size, max(4 * need, 1 << 16),
                       mean_doc_tokens=40 if opts.smoke else 1000)
    rows = []
    settings = train_settings(opts.micro_batches, opts.smoke)
    if opts.train_settings:
        settings = [s for s in settings if s.name in opts.train_settings]
    for setting in settings:
        left = deadline - time.perf_counter()
        needed = opts.min_compile_s if setting.compile else opts.min_eager_s
        if left < needed:
            rows.append(dict(setting=setting.name, **asdict(setting), status="skipped (time budget)"))
            continue
        rows.append(run_train_setting(setting, opts, data, work, deadline, log))
        print(format_train_rows(rows[-1:], header=not rows[:-1]), flush=True)
    return dict(config=opts.config, block_size=config.block_size, num_params=config.num_params,
                flops_per_token=config.flops_per_token(config.block_size), warmup_steps=opts.warmup_steps,
                measure_steps=opts.measure_steps, rows=rows)


HF_VARIANTS = (("hf", False, False), ("hf-compile", False, True), ("hf-liger", True, False),
               ("hf-liger-compile", True, True))


def section_hf(opts, work: Path, deadline: float, log) -> dict:
    """transformers' LlamaForCausalLM on the same config and shards (scripts/bench_hf_train.py),
    plain, compiled, with Liger-Kernel's patches and with both, at micro-batch 8 x 4 (smoke:
    the smallest micro-batch x 2). Liger rows without Liger-Kernel are skipped with the reason."""
    from model import Config

    config = Config.from_name(opts.config, **({"block_size": opts.block_size} if opts.block_size else {}))
    mb, accum = (opts.micro_batches[0], 2) if opts.smoke else (8, 4)
    need = mb * accum * (config.block_size + 1) * (opts.warmup_steps + opts.measure_steps)
    data = make_shards(work / "data", config.vocab_size, max(4 * need, 1 << 16),
                       mean_doc_tokens=40 if opts.smoke else 1000)
    liger = importlib.util.find_spec("liger_kernel") is not None
    rows = []
    for name, use_liger, use_compile in HF_VARIANTS:
        row = dict(setting=name, micro_batch=mb, accumulation=accum, liger=use_liger, compile=use_compile)
        if use_liger and not liger:
            row["status"] = "skipped (Liger-Kernel not installed: pip install liger-kernel, or .wheels/)"
            print(f"gpu_bench: {name} {row['status']}", flush=True)
        elif deadline - time.perf_counter() < (opts.min_compile_s if use_compile else opts.min_eager_s):
            row["status"] = "skipped (time budget)"
        else:
            result_file = work / f"{name}.json"
            cmd = [sys.executable, str(ROOT / "scripts" / "bench_hf_train.py"), "--config", opts.config,
                   "--data", *data, "--micro-batch", str(mb), "--accumulation", str(accum),
                   "--steps", str(opts.warmup_steps + opts.measure_steps), "--warmup-steps", str(opts.warmup_steps),
                   "--json", str(result_file)] + (["--block-size", str(opts.block_size)] if opts.block_size else []) \
                + (["--liger"] if use_liger else []) + (["--compile"] if use_compile else [])
            code, text, seconds = run_child(cmd, deadline - time.perf_counter())
            log(f"===== {name}: exit {code}, {seconds:.1f} s\n$ {' '.join(cmd)}\n{text[-6000:]}\n")
            row["wall_s"] = round(seconds, 1)
            if code == 0 and result_file.exists():
                row.update(json.loads(result_file.read_text()), status="ok")
                row["loss_first"], row["loss_last"] = row["losses"][0], row["losses"][-1]
            elif code is None:
                row["status"] = "cut (time budget)"
            else:
                lines = [ln for ln in text.strip().splitlines() if ln.strip()]
                row["status"] = "out of memory" if "out of memory" in text else "error"
                row["error"] = lines[-1][:300] if lines else f"exit code {code}"
        rows.append(row)
    return dict(config=opts.config, block_size=config.block_size, rows=rows)


def format_hf_rows(rows: list[dict]) -> str:
    lines = ["| transformers LlamaForCausalLM | status | tokens/s | step s | peak reserved GB | loss first→last |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['setting']} (mb {r['micro_batch']} x {r['accumulation']}) | {status} | "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('step_s'), '.3f')} | "
                     f"{_fmt(r.get('peak_reserved_gb'), '.1f')} | "
                     f"{_fmt(r.get('loss_first'), '.3f')}→{_fmt(r.get('loss_last'), '.3f')} |")
    return "\n".join(lines)


def section_generate(opts, work: Path, deadline: float, log) -> dict:
    result_file = work / "generate.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--config", opts.gen_config,
           "--batch", str(opts.gen_batch), "--prompt-len", str(opts.gen_prompt_len),
           "--new-tokens", str(opts.gen_new_tokens), "--dtype", opts.gen_dtype, "--hf-cache", "dynamic,static",
           "--json", str(result_file)]
    if opts.smoke:
        cmd += ["--vocab-size", "512"]
    code, text, seconds = run_child(cmd, deadline - time.perf_counter())
    log(f"===== generate: exit {code}, {seconds:.1f} s\n$ {' '.join(cmd)}\n{text[-6000:]}\n")
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    result["status"] = "ok" if code == 0 else ("cut (time budget)" if code is None else "error")
    if code not in (0, None):
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        result["error"] = lines[-1][:300] if lines else f"exit code {code}"
    result["wall_s"] = round(seconds, 1)
    return result


def _load_bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "scripts" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # its dataclasses look the module up while it loads
    spec.loader.exec_module(module)
    return module


def section_kernels(opts, deadline: float) -> dict:
    import torch

    bk = _load_bench_kernels()
    cuda = torch.cuda.is_available() and not opts.smoke
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = bk.TINYLLAMA if cuda else bk.SMOKE
    rep = opts.kernel_rep if cuda else 20
    torch.manual_seed(0)
    copy_gbs = bk.copy_bandwidth_gbs(device, 2**30 if device.type == "cuda" else 2**24, rep)
    rows, skipped = [], []
    cases = bk.build_cases(list(bk.KERNELS), opts.kernel_batches if cuda else [2], shapes, torch.bfloat16, device,
                           use_compile=cuda)
    for case in cases:
        if time.perf_counter() > deadline:
            skipped.append(f"{case.kernel}@{case.tokens}")
            continue
        rows += bk.run_case(case, device, rep, copy_gbs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    attn = attention_backends(device, cuda, shapes, deadline, rep)
    return dict(copy_gbs=copy_gbs, matmul_tflops=matmul_tflops(device, cuda), liger=bk._liger() is not None,
                rows=rows, skipped=skipped, summary=bk.summarize(rows), attention=attn)


def attention_backends(device, cuda: bool, shapes: dict, deadline: float, rep: int) -> list[dict]:
    """Causal GQA attention of one training micro-batch, forward + backward, per SDPA backend.

    The model calls SDPA with enable_gqa (32 query heads share 4 KV heads) and lets PyTorch
    pick; this shows what it picked costs against each backend forced, with K/V repeated
    for the backends that do not take GQA. TFLOP/s counts the causal half only.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bk = sys.modules["bench_kernels"]
    B, T = (8 if cuda else 1), shapes["seq"]
    hq, hk, D = shapes["n_head"], shapes["n_kv_head"], shapes["head_dim"]
    flops = 3.5 * 2 * B * hq * T * T * D  # causal forward 2·B·H·T²·D, backward 2.5x the forward
    dtype = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(B, hq, T, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, hk, T, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, hk, T, D, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(B, hq, T, D, device=device, dtype=dtype)
    variants = [("auto, enable_gqa (what the model runs)", None, True)]
    if cuda:
        variants += [("flash, enable_gqa", SDPBackend.FLASH_ATTENTION, True),
                     ("cudnn, K/V repeated", SDPBackend.CUDNN_ATTENTION, False),
                     ("efficient, K/V repeated", SDPBackend.EFFICIENT_ATTENTION, False)]
    rows = []
    for name, backend, gqa in variants:
        if time.perf_counter() > deadline:
            rows.append(dict(variant=name, error="skipped (time budget)"))
            continue

        def step(backend=backend, gqa=gqa):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1))
            if backend is None:
                y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            else:
                with sdpa_kernel(backend):
                    y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            y.backward(dy)
        row = dict(variant=name, batch=B, seq=T)
        try:
            step()
            row["ms"] = bk.time_ms(step, (q, k, v), device, rep)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        except Exception as e:  # a backend that refuses these shapes is a result
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        rows.append(row)
    return rows


def matmul_tflops(device, cuda: bool) -> float | None:
    """bf16 matrix-product rate on random data: the compute ceiling MFU is measured against."""
    import torch

    if not cuda:
        return None
    from triton.testing import do_bench

    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---- reporting -------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_train_rows(rows: list[dict], header: bool = True) -> str:
    lines = ["| setting | status | tokens/s | step s | MFU (6N'+attn) | MFU (6N) | peak alloc GB | "
             "peak reserved GB | first step s | loss first→last |", "|---|---|---|---|---|---|---|---|---|---|"] \
        if header else []
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['setting']} | {status} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('mfu_6n'), '.1%')} | "
                     f"{_fmt(r.get('peak_alloc_gb'), '.1f')} | {_fmt(r.get('peak_reserved_gb'), '.1f')} | "
                     f"{_fmt(r.get('first_step_s'), '.1f')} | "
                     f"{_fmt(r.get('loss_first'), '.3f')}→{_fmt(r.get('loss_last'), '.3f')} |")
    return "\n".join(lines)


def format_generate(g: dict) -> str:
    if "ours" not in g:
        return f"generation: {g.get('status')} {g.get('error', '')}"
    lines = [f"{g['config']}, batch {g['batch']}, prompts <= {g['prompt_len']} tokens, {g['new_tokens']} new tokens, "
             f"{g['dtype']}", "", "| generator | tokens/s | ours is faster by | greedy rows identical |",
             "|---|---|---|---|", f"| ours (finetune/generate.py, KV cache) | {g['ours']:,.0f} | - | - |"]
    for cache in ("dynamic", "static"):
        if f"hf_{cache}" in g:
            lines.append(f"| transformers generate, {cache} cache | {g[f'hf_{cache}']:,.0f} | "
                         f"{g['ours'] / g[f'hf_{cache}']:.2f}x | {g[f'hf_{cache}_identical_rows']}/{g['rows']} |")
        elif f"hf_{cache}_error" in g:
            lines.append(f"| transformers generate, {cache} cache | error: {g[f'hf_{cache}_error']} | | |")
        else:
            lines.append(f"| transformers generate, {cache} cache | not measured ({g.get('status')}) | | |")
    return "\n".join(lines)


def format_kernels(k: dict) -> str:
    lines = [f"copy bandwidth {k['copy_gbs']:,.0f} GB/s (read + write); bf16 matmul "
             f"{_fmt(k.get('matmul_tflops'), ',.0f', 'n/a')} TFLOP/s; Liger-Kernel "
             f"{'importable' if k['liger'] else 'not installed'}", "",
             "| kernel | tokens | impl | fwd+bwd ms | GB/s | % copy | TFLOP/s | fwd ms | fwd GB/s | fwd % copy | "
             "peak MB | fwd+bwd device ms | device % copy |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['tokens']} | {r['impl']} | error: {r['error']} | | | | | | | | | |")
            continue
        tf = r.get("tflops")
        lines.append(f"| {r['kernel']} | {r['tokens']} | {r['impl']} | {r['ms']:.3f} | {_fmt(r.get('gbs'), ',.0f')} | "
                     f"{_fmt(r.get('pct_copy'), '.0f')} | {_fmt(tf, '.0f')} | {_fmt(r.get('fwd_ms'), '.3f')} | "
                     f"{_fmt(r.get('fwd_gbs'), ',.0f')} | {_fmt(r.get('fwd_pct_copy'), '.0f')} | "
                     f"{_fmt(r.get('peak_mb'), ',.0f')} | {_fmt(r.get('dev_ms'), '.3f')} | "
                     f"{_fmt(r.get('dev_pct_copy'), '.0f')} |")
    if k["skipped"]:
        lines.append(f"\nskipped (time budget): {', '.join(k['skipped'])}")
    if k.get("attention"):
        lines += ["", "| causal GQA attention, fwd+bwd | ms | TFLOP/s |", "|---|---|---|"]
        for r in k["attention"]:
            lines.append(f"| {r['variant']} | " + (f"error: {r['error']} | |" if "error" in r else
                                                   f"{r['ms']:.3f} | {r['tflops']:.0f} |"))
    return "\n".join(lines)


def target_lines(result: dict) -> list[str]:
    """Each target with the measured figure beside it (reported, not asserted)."""
    out = []
    train = result.get("train", {}).get("rows", [])
    ok = [r for r in train if r.get("status") == "ok" and r.get("mfu") is not None]
    if ok:
        best = max(ok, key=lambda r: r["tokens_per_s"])
        out.append(f"MFU target >= {TARGETS['mfu']:.0%}: best {best['setting']} {best['tokens_per_s']:,.0f} tokens/s, "
                   f"MFU {best['mfu']:.1%} (6N'+attn) / {best['mfu_6n']:.1%} (6N, TinyLlama's convention)")
        accum8 = [r for r in ok if r["micro_batch"] == 8 and r.get("accumulation", 1) > 1]
        if accum8:
            r = max(accum8, key=lambda r: r["tokens_per_s"])
            out.append(f"MFU at micro-batch 8 with accumulation (target >= {TARGETS['mfu_mb8_accum']:.0%}): "
                       f"{r['setting']} {r['mfu']:.1%}")
        hf = [r for r in result.get("hf", {}).get("rows", []) if r.get("status") == "ok" and r.get("liger")]
        ours = [r for r in ok if r.get("accumulation", 1) > 1 and not r["compile"] and not r["activation_checkpointing"]]
        if hf and ours:
            theirs, mine = max(hf, key=lambda r: r["tokens_per_s"]), max(ours, key=lambda r: r["tokens_per_s"])
            out.append(f"vs transformers + Liger (target >= {TARGETS['vs_hf_liger']}x): {mine['setting']} "
                       f"{mine['tokens_per_s']:,.0f} / {theirs['setting']} {theirs['tokens_per_s']:,.0f} tokens/s = "
                       f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
        elif result.get("hf"):
            out.append("vs transformers + Liger: not measured (" + ", ".join(
                f"{r['setting']}: {r['status']}" for r in result["hf"]["rows"] if r.get("liger")) + ")")
    fp8 = {r["setting"]: r for r in ok if r.get("fp8")}
    for name, r in fp8.items():
        bf16 = next((b for b in ok if b["setting"] == name.replace("-fp8", "")), None)
        if bf16:
            out.append(f"FP8 {name} (targets >= {TARGETS['fp8_speedup']}x bf16 tokens/s, loss within "
                       f"{TARGETS['fp8_loss_rel']:.0%}; 50-step loss: docs/benchmarks.md round 2 plan): "
                       f"{r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x, last loss {r['loss_last']:.4f} vs "
                       f"{bf16['loss_last']:.4f}")
    mb8 = [r for r in train if r.get("micro_batch") == 8 and r.get("peak_reserved_gb") is not None]
    for r in mb8:
        out.append(f"memory at micro-batch 8 x {result['train']['block_size']} ({r['setting']}): "
                   f"{r['peak_alloc_gb']:.1f} GB allocated, {r['peak_reserved_gb']:.1f} GB reserved "
                   f"(target: within {TARGETS['mb8_memory_gb']:.0f} GB)")
    out += result.get("kernels", {}).get("summary", [])
    g = result.get("generate", {})
    for cache in ("dynamic", "static"):
        if g.get("ours") and g.get(f"hf_{cache}"):
            out.append(f"generation vs transformers ({cache} cache): {g['ours'] / g[f'hf_{cache}']:.2f}x "
                       f"(target >= {TARGETS['generate_speedup']:.0f}x against the static cache)")
    return out


def write_report(out: Path, result: dict) -> None:
    """JSON and markdown, each written whole to a temporary name and renamed (never half-written)."""
    md = [f"# gpu_bench: {result['device']} ({result['commit']}, {result['date']})", "",
          f"torch {result['versions'].get('torch')}, triton {result['versions'].get('triton')}, "
          f"transformers {result['versions'].get('transformers')}, liger {result['versions'].get('liger_kernel')}, "
          f"flash-attn {result['versions'].get('flash_attn')}; budget {result['budget_s']} s, "
          f"elapsed {result.get('elapsed_s', 0):.0f} s", ""]
    if "train" in result:
        t = result["train"]
        md += [f"## Pretraining {t['config']} (context {t['block_size']}, global batch = micro-batch, median of "
               f"{t['measure_steps']} steps after {t['warmup_steps']} warm-up)", "", format_train_rows(t["rows"]), ""]
    if "hf" in result:
        md += [f"## transformers on the same config and data ({result['hf']['config']})", "",
               format_hf_rows(result["hf"]["rows"]), ""]
    if "generate" in result:
        md += ["## Generation", "", format_generate(result["generate"]), ""]
    if "kernels" in result:
        md += ["## Kernels (bf16)", "", format_kernels(result["kernels"]), ""]
    md += ["## Against the targets", ""] + [f"- {line}" for line in target_lines(result)]
    for name, text in (("gpu_bench.json", json.dumps(result, indent=1)), ("gpu_bench.md", "\n".join(md) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def versions() -> dict:
    from importlib import metadata

    found = {}
    for module, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                         ("lightning", "lightning"), ("liger_kernel", "liger-kernel"), ("flash_attn", "flash-attn")):
        try:
            __import__(module)  # importable, not only installed: a broken wheel counts as absent
            found[module] = metadata.version(dist)
        except Exception:  # reported as absent: a missing optional package is a fact of the run
            found[module] = None
    return found


def device_name() -> str:
    """The GPU's name from nvidia-smi, so the parent process opens no CUDA context before the
    training processes run (they get the whole card)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_bench.json, gpu_bench.md, train_logs.txt")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter): checks every path")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole run, seconds")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--commit", default=None, help="commit recorded in the report (default: git rev-parse)")
    g = p.add_argument_group("pretraining")
    g.add_argument("--config", default="tinyllama-1.1b", help="model preset")
    g.add_argument("--block-size", type=int, default=None, help="context; default: the preset's")
    g.add_argument("--micro-batches", default="4,8,16", help="micro-batch sizes, comma-separated")
    g.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the median")
    g.add_argument("--measure-steps", type=int, default=4, help="steps in the median")
    g.add_argument("--profile", default="mb8x4",
                   help="settings (comma-separated names such as mb8, mb16-ac) to profile one extra step of; "
                        "the op tables land in train_logs.txt")
    g.add_argument("--train-settings", default="",
                   help="run only these settings of the grid (comma-separated names such as mb8x4,mb16x2-keep), "
                        "to split the grid into calls that each stay under 8 minutes")
    g.add_argument("--min-eager-s", type=float, default=25.0, help="start an eager setting only with this much time left")
    g.add_argument("--min-compile-s", type=float, default=75.0, help="start a compiled setting only with this much left")
    g = p.add_argument_group("time kept for the later sections")
    g.add_argument("--reserve-hf-s", type=float, default=150.0, help="kept from pretraining for the transformers rows")
    g.add_argument("--reserve-generate-s", type=float, default=75.0, help="kept from pretraining for generation")
    g.add_argument("--reserve-kernels-s", type=float, default=75.0, help="kept from generation for the kernels")
    g = p.add_argument_group("generation")
    g.add_argument("--gen-config", default="tinyllama-1.1b")
    g.add_argument("--gen-batch", type=int, default=64)
    g.add_argument("--gen-prompt-len", type=int, default=128)
    g.add_argument("--gen-new-tokens", type=int, default=256)
    g.add_argument("--gen-dtype", default="bf16", choices=["bf16", "fp32"])
    g = p.add_argument_group("kernels")
    g.add_argument("--kernel-batches", default="8", help="sequences of 2048 tokens, comma-separated")
    g.add_argument("--kernel-rep", type=int, default=100, help="do_bench measuring time per case, ms")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    try:
        args.micro_batches = sorted(int(b) for b in args.micro_batches.split(","))
        args.kernel_batches = [int(b) for b in args.kernel_batches.split(",")]
    except ValueError:
        p.error("--micro-batches and --kernel-batches take comma-separated integers")
    args.profile = [s.strip() for s in args.profile.split(",") if s.strip()]
    args.train_settings = [s.strip() for s in args.train_settings.split(",") if s.strip()]
    if args.smoke:
        args.profile = ["mb1"]
        # Tiny model and shapes; the CPU runs everything through the same code paths.
        args.config, args.block_size, args.micro_batches = "tiny", None, [1, 2]
        args.warmup_steps, args.measure_steps = 1, 2
        args.min_eager_s = args.min_compile_s = 1.0
        args.gen_config, args.gen_batch, args.gen_prompt_len, args.gen_new_tokens, args.gen_dtype = \
            "tiny", 4, 8, 8, "fp32"
        args.reserve_hf_s = args.reserve_generate_s = args.reserve_kernels_s = 0.0
        args.budget_s = max(args.budget_s, 600.0)
    return args


def main(argv=None) -> int:
    opts = parse_args(argv)
    import torch

    if not opts.smoke and not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA device found; it measures TinyLlama-1.1B on a GPU. Run it on a machine "
              "with one, or add --smoke to check every path on this CPU with tiny shapes.", file=sys.stderr)
        return 2
    if opts.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels section runs Triton on the CPU
    start = time.perf_counter()
    deadline = start + opts.budget_s
    opts.out.mkdir(parents=True, exist_ok=True)
    log_path = opts.out / "train_logs.txt"
    log_path.write_text("")

    def log(text: str) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(text)

    result = dict(device=device_name(), commit=opts.commit or git_commit(), date=time.strftime("%Y-%m-%d"),
                  versions=versions(), budget_s=opts.budget_s, smoke=opts.smoke, targets=TARGETS)
    print(f"gpu_bench: {result['device']}, commit {result['commit']}, budget {opts.budget_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_bench-") as tmp:
        work = Path(tmp)
        if "train" in opts.sections:
            later = (opts.reserve_hf_s if "hf" in opts.sections else 0) + \
                (opts.reserve_generate_s if "generate" in opts.sections else 0) + \
                (opts.reserve_kernels_s if "kernels" in opts.sections else 0)
            result["train"] = section_train(opts, work, deadline - later, log)
            result["elapsed_s"] = time.perf_counter() - start
            write_report(opts.out, result)
        if "hf" in opts.sections:
            later = (opts.reserve_generate_s if "generate" in opts.sections else 0) + \
                (opts.reserve_kernels_s if "kernels" in opts.sections else 0)
            result["hf"] = section_hf(opts, work, deadline - later, log)
            result["elapsed_s"] = time.perf_counter() - start
            write_report(opts.out, result)
            print(format_hf_rows(result["hf"]["rows"]), flush=True)
        if "generate" in opts.sections:
            later = opts.reserve_kernels_s if "kernels" in opts.sections else 0
            result["generate"] = section_generate(opts, work, deadline - later, log)
            result["elapsed_s"] = time.perf_counter() - start
            write_report(opts.out, result)
            print(format_generate(result["generate"]), flush=True)
        if "kernels" in opts.sections:
            result["kernels"] = section_kernels(opts, deadline)
            result["elapsed_s"] = time.perf_counter() - start
            write_report(opts.out, result)
            print(format_kernels(result["kernels"]), flush=True)
    print("\n".join(["", "against the targets:"] + [f"  {line}" for line in target_lines(result)]))
    print(f"gpu_bench: {time.perf_counter() - start:.0f} s; wrote {opts.out / 'gpu_bench.json'}, "
          f"{opts.out / 'gpu_bench.md'}, {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
