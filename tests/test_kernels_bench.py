"""scripts/bench_kernels.py: a clear message and exit code 2 without CUDA, and a --smoke run
(tiny shapes, CPU interpreter) that measures every kernel and implementation and writes JSON."""
import os

import torch

# Without a GPU the Triton kernels run on the CPU interpreter (set before triton is imported).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json

import pytest
from conftest import load_script


def _load():
    return load_script("bench_kernels")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real benchmark")
def test_bench_without_cuda_exits_with_message(capsys):
    assert _load().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_smoke_measures_every_kernel(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _load().main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["copy_gbs"] > 0
    assert not [r for r in rows if "error" in r]
    bench = _load()
    assert {r["kernel"] for r in rows} == set(bench.KERNELS)
    for r in rows:
        assert r["ms"] > 0
        assert ("gbs" in r) != ("tflops" in r)  # bandwidth for element-wise kernels, FLOP/s for the GEMMs
    assert {r["impl"] for r in rows if r["kernel"] == "fused_linear_cross_entropy"} >= {"triton", "F.cross_entropy"}
    assert "speedup vs F.cross_entropy" in capsys.readouterr().out


def test_bench_rejects_unknown_kernel():
    with pytest.raises(SystemExit):
        _load().parse_args(["--kernels", "rms_norm,nope"])
