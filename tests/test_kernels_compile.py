"""Every Triton kernel compiles for a real GPU (sm_90, to cubin) even on a machine without
one: the CPU interpreter accepts code the compiler rejects (e.g. loop-carried type changes),
so this catches what the parity tests cannot. Run as a script, this file does the
compiling; the test runs it in a subprocess without TRITON_INTERPRET."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

I32, F32 = "i32", "fp32"


def _cases():
    """(kernel, {arg: type}, {constexpr: value}, num_warps): TinyLlama and small-test configs."""
    import importlib

    rn, sw, rp, ce = (importlib.import_module(f"kernels.{m}") for m in ("rms_norm", "swiglu", "rope", "cross_entropy"))
    rms_fwd = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", rstd_ptr="*fp32", x_row_stride=I32,
                   y_row_stride=I32, n_rows=I32, n_cols=I32, eps=F32)
    rms_bwd = dict(dy_ptr="*bf16", x_ptr="*bf16", w_ptr="*bf16", rstd_ptr="*fp32", dx_ptr="*bf16",
                   dw_partial_ptr="*fp32", dy_row_stride=I32, x_row_stride=I32, dx_row_stride=I32, n_rows=I32,
                   n_cols=I32, rows_per_program=I32)
    sw_fwd = dict(g_ptr="*bf16", u_ptr="*bf16", y_ptr="*bf16", g_row_stride=I32, u_row_stride=I32,
                  y_row_stride=I32, n_rows=I32, n_cols=I32)
    sw_bwd = dict(dy_ptr="*bf16", g_ptr="*bf16", u_ptr="*bf16", dg_ptr="*bf16", du_ptr="*bf16", dy_row_stride=I32,
                  g_row_stride=I32, u_row_stride=I32, out_row_stride=I32, n_rows=I32, n_cols=I32)
    ce_fwd = dict(logits_ptr="*bf16", row_stride=I32, targets_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32",
                  n_cols=I32, ignore_index=I32, z_loss=F32)
    ce_grad = dict(logits_ptr="*bf16", logits_stride=I32, grad_ptr="*bf16", grad_stride=I32, targets_ptr="*i64",
                   lse_ptr="*fp32", scale_ptr="*fp32", n_cols=I32, ignore_index=I32, z_loss=F32)
    rope = {n: I32 for n in rp._rope_kernel.arg_names if not n.startswith(("BLOCK", "INVERSE"))}
    rope.update(q_ptr="*bf16", k_ptr="*bf16", qo_ptr="*bf16", ko_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32")
    return [
        (rn._rms_norm_fwd_kernel, rms_fwd, dict(BLOCK_M=1, BLOCK_N=2048), 8),
        (rn._rms_norm_fwd_kernel, rms_fwd, dict(BLOCK_M=16, BLOCK_N=64), 4),
        (rn._rms_norm_bwd_kernel, rms_bwd, dict(BLOCK_M=1, BLOCK_N=2048), 8),
        (rn._rms_norm_bwd_kernel, rms_bwd, dict(BLOCK_M=16, BLOCK_N=64), 4),
        (sw._swiglu_fwd_kernel, sw_fwd, dict(BLOCK_M=2, BLOCK_N=512), 4),
        (sw._swiglu_bwd_kernel, sw_bwd, dict(BLOCK_M=2, BLOCK_N=512), 4),
        (rp._rope_kernel, rope, dict(BLOCK_T=2, BLOCK_HQ=32, BLOCK_HK=4, BLOCK_HALF=32, INVERSE=False), 8),
        (rp._rope_kernel, rope, dict(BLOCK_T=64, BLOCK_HQ=4, BLOCK_HK=2, BLOCK_HALF=8, INVERSE=True), 8),
        (ce._ce_fwd_kernel, ce_fwd, dict(BLOCK=8192), 16),
        (ce._ce_fwd_kernel, dict(ce_fwd, logits_ptr="*fp32", targets_ptr="*i32"), dict(BLOCK=1024), 4),
        (ce._ce_grad_kernel, ce_grad, dict(BLOCK=8192), 16),
    ]


def compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for fn, types, constexprs, warps in _cases():
        names = fn.arg_names
        signature = {n: types.get(n, "constexpr") for n in names}
        src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            print(f"ok   {fn.__name__} {constexprs}")
        except Exception as e:  # report every kernel, not just the first failure
            failures += 1
            print(f"FAIL {fn.__name__} {constexprs}: {type(e).__name__}: {e}")
    return failures


def test_every_kernel_compiles_for_sm90():
    from conftest import require_module

    # setup.py installs triton on Linux x86-64 only; elsewhere there is nothing to compile.
    if not (platform.system() == "Linux" and platform.machine() == "x86_64"):
        pytest.skip("triton has no wheels for this platform")
    require_module("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    out = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == len(_cases())




# --- register budget: compiled as the launcher compiles them (16-aligned pointers and strides) ---

def _resource_usage(fn, types, constexprs, warps, **options) -> dict:
    """{'REG': n, 'LOCAL': spill bytes, ...} of `fn` compiled for sm_90, read with Triton's cuobjdump."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    # At run time Triton specialises 16-divisible integers and 16-aligned pointers; without
    # that the loads are not vectorised and the register counts are not the real ones.
    divisible = [n for n in names if str(types.get(n, "")).startswith("*") or
                 (types.get(n) == I32 and "ignore" not in n)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **options})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", out)}


def report_registers() -> int:
    """Registers and spills of every case, plus the RMSNorm backward under its launch cap."""
    import importlib

    rn = importlib.import_module("kernels.rms_norm")
    failures = 0
    cases = [(fn, types, c, w, {}) for fn, types, c, w in _cases()]
    rms_bwd = [(fn, types, c, w) for fn, types, c, w, _ in cases if fn is rn._rms_norm_bwd_kernel]
    for d in (4096, 8192):  # wider models: 16 warps, 8 and 16 elements per thread
        rms_bwd.append((rn._rms_norm_bwd_kernel, rms_bwd[0][1], dict(zip(("BLOCK_M", "BLOCK_N"), rn._blocks(d)[:2])),
                        rn._blocks(d)[2]))
    cases += [(fn, types, c, w, {"maxnreg": rn._bwd_max_regs(c["BLOCK_M"], c["BLOCK_N"], w)})
              for fn, types, c, w in rms_bwd]
    for fn, types, constexprs, warps, options in cases:
        use = _resource_usage(fn, types, constexprs, warps, **options)
        spilled = use.get("LOCAL", 0) or use.get("STACK", 0)
        over = "maxnreg" in options and use["REG"] > options["maxnreg"]
        failures += bool(spilled or over)
        print(f"{'FAIL' if spilled or over else 'ok  '} regs {use['REG']:3d} local {use.get('LOCAL', 0)} "
              f"{fn.__name__} {constexprs} warps {warps} {options}")
    return failures


def test_no_kernel_spills_registers():
    from conftest import require_module

    if not (platform.system() == "Linux" and platform.machine() == "x86_64"):
        pytest.skip("triton has no wheels for this platform")
    require_module("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, __file__, "--registers"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") >= len(_cases())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:] == ["--registers"]:
        sys.exit(1 if report_registers() else 0)
    sys.exit(1 if compile_all() else 0)
