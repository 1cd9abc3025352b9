"""scripts/gpu_bench.py: the --smoke run exercises every path on CPU and writes the report;
the grid and the time budget behave as documented."""
import json
import time

import pytest
import torch
from conftest import load_script


def _load():
    return load_script("gpu_bench")


def test_full_grid_is_every_setting_once_plain_first():
    gb = _load()
    grid = gb.train_settings([4, 8, 16], smoke=False)
    assert len(grid) == len(set(grid)) == 19
    plain = [s for s in grid if not s.document_mask and s.accumulation == 1]
    assert {(s.micro_batch, s.activation_checkpointing, s.compile) for s in plain} == \
        {(mb, ac, c) for mb in (4, 8, 16) for ac in (False, True) for c in (False, True)}
    # the real recipe first: a global batch of 32 sequences by accumulation, both FSDP modes
    assert [s.name for s in grid[:10]] == ["mb8x4", "mb16x2", "mb8x4-keep", "mb16x2-keep", "mb8x4-compile-fp8",
                                           "mb8x4-compile", "mb8", "mb4", "mb16", "mb8-docmask"]
    assert all(s.micro_batch * s.accumulation == 32 for s in grid[:4])


def test_settings_past_the_budget_are_recorded_as_skipped(tmp_path):
    gb = _load()
    opts = gb.parse_args(["--out", str(tmp_path), "--smoke"])
    result = gb.section_train(opts, tmp_path, deadline=time.perf_counter() - 1, log=lambda text: None)
    assert [r["status"] for r in result["rows"]] == ["skipped (time budget)"] * 8
    assert "skipped (time budget)" in gb.format_train_rows(result["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this runs the benchmark")
def test_without_cuda_it_refuses_unless_smoke(tmp_path, capsys):
    assert _load().main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "gpu_bench.json").exists()


def test_train_settings_pick_rows_of_the_grid(tmp_path):
    gb = _load()
    opts = gb.parse_args(["--out", str(tmp_path), "--smoke", "--train-settings", "mb1x2,mb2x2-keep"])
    result = gb.section_train(opts, tmp_path, deadline=time.perf_counter() - 1, log=lambda text: None)
    assert [r["setting"] for r in result["rows"]] == ["mb1x2", "mb2x2-keep"]


def test_log_facts_read_the_kernel_and_the_busy_share():
    facts = _load().log_facts("backends: attention sdpa-cudnn (measured), kernels triton\n"
                              "profile: GPU busy 217.5 ms of the 235.0 ms step (92.6%)\n")
    assert facts == {"attention_kernel": "sdpa-cudnn", "gpu_busy_share": 217.5 / 235.0}


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _load().parse_args(["--out", str(tmp_path), "--sections", "train,nope"])


@pytest.mark.slow
def test_smoke_run_measures_every_path(tmp_path, capsys):
    gb = _load()
    assert gb.main(["--out", str(tmp_path), "--smoke"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {r["setting"]: r for r in result["train"]["rows"]}
    assert set(rows) == {"mb1", "mb2-ac", "mb1-compile", "mb2-ac-compile", "mb2-docmask", "mb1x2", "mb2x2-keep",
                         "mb1x2-fp8"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["measured_steps"] == 2 and r["peak_alloc_gb"] > 0
        assert r["attention_kernel"] == "sdpa"
    assert rows["mb1-compile"]["graph_breaks"] == 0 and rows["mb1"]["graph_breaks"] is None
    assert rows["mb1x2"]["tokens_per_step"] == 2 * rows["mb1"]["tokens_per_step"]
    # the same data and seed: emulated FP8 is close to, but not, the fp32 run
    assert rows["mb1x2-fp8"]["loss_first"] == pytest.approx(rows["mb1x2"]["loss_first"], rel=0.02)
    assert "float8 training on" in (tmp_path / "train_logs.txt").read_text()
    hf = {r["setting"]: r for r in result["hf"]["rows"]}
    assert set(hf) == {"hf", "hf-compile", "hf-liger", "hf-liger-compile"}
    assert hf["hf"]["status"] == hf["hf-compile"]["status"] == "ok" and hf["hf"]["tokens_per_s"] > 0
    for name in ("hf-liger", "hf-liger-compile"):  # Liger-Kernel is not a CPU test dependency
        assert hf[name]["status"].startswith("skipped (Liger-Kernel not installed") or hf[name]["status"] == "ok"
    # the same seed and data: checkpointing and compiling change nothing in the losses
    assert rows["mb1"]["loss_first"] == pytest.approx(rows["mb1-compile"]["loss_first"], rel=1e-4)
    assert rows["mb2-ac"]["loss_first"] == pytest.approx(rows["mb2-ac-compile"]["loss_first"], rel=1e-4)
    assert rows["mb2-docmask"]["loss_first"] != rows["mb2-ac"]["loss_first"]  # documents are masked
    assert "attention within documents (EOS id 2): kernel sdpa-mask" in (tmp_path / "train_logs.txt").read_text()
    gen = result["generate"]
    assert gen["status"] == "ok" and gen["ours"] > 0
    assert gen["hf_dynamic_identical_rows"] == gen["hf_static_identical_rows"] == gen["rows"]  # fp32 greedy
    kernels = result["kernels"]
    assert {r["kernel"] for r in kernels["rows"]} == {"rms_norm", "rope", "swiglu", "cross_entropy",
                                                       "fused_linear_cross_entropy"}
    assert not [r for r in kernels["rows"] if "error" in r]
    assert all(r["fwd_ms"] > 0 for r in kernels["rows"])
    assert kernels["attention"] and "error" not in kernels["attention"][0]
    md = (tmp_path / "gpu_bench.md").read_text()
    for heading in ("## Pretraining tiny", "## transformers on the same config", "## Generation", "## Kernels",
                    "## Against the targets"):
        assert heading in md
    logs = (tmp_path / "train_logs.txt").read_text()
    assert "profile of step 4" in logs  # mb1 profiles one extra step after its 3
    assert "against the targets" in capsys.readouterr().out
