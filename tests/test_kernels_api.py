"""The kernels package switch: backend resolution, both op bundles, and that `kernels`
imports without Triton (macOS) while its Triton functions then fail with a clear error."""
import os

import torch

# Without a GPU the Triton kernels run on the CPU interpreter (set before triton is imported).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest

import kernels

REPO = Path(__file__).resolve().parents[1]
OPS = ("rms_norm", "apply_rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")


def test_resolve_backend_and_bundles():
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.resolve_backend("auto", "meta") == "torch"
    assert kernels.resolve_backend("triton", DEVICE) == "triton"  # CUDA, or CPU with TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.resolve_backend("cuda", "cpu")
    for name in OPS:
        assert getattr(kernels.get_ops("triton"), name) is getattr(kernels, name)
        assert getattr(kernels.get_ops("torch"), name) is getattr(kernels, f"{name}_reference")


def test_import_without_triton_and_clear_error():
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton hidden for this test")
sys.meta_path.insert(0, NoTriton())
import torch, kernels
assert kernels.get_ops("torch").swiglu(torch.ones(2), torch.ones(2)).shape == (2,)
try:
    kernels.swiglu(torch.ones(2), torch.ones(2))
except RuntimeError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "triton is not installed" in out.stdout and "kernels='torch'" in out.stdout


def test_cpu_tensors_rejected_when_kernels_were_built_for_cuda():
    # Without TRITON_INTERPRET at import time the kernels are compiled for a GPU: CPU tensors
    # must get the fix in the message, not a Triton driver traceback.
    code = "import torch, kernels; kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode != 0
    assert "set TRITON_INTERPRET=1 before importing kernels" in out.stderr
