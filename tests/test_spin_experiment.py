"""scripts/spin_experiment.py --quick: every stage of the SFT-vs-SPIN study runs (the product's own
sft.py and spin.py, the three held-out measures, the summary over seeds, the plot), its
evaluation agrees with sft.py's own held-out loss, and a re-run reuses the finished runs."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import spin_experiment  # noqa: E402


def study_env() -> dict:
    """The study runs two trainings at a time: one MASTER_PORT (conftest's reserved port) for
    both would collide, so each gets the free port Lightning picks for a run without one."""
    return {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}


def run_quick(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "spin_experiment.py"), "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=900, env=study_env())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    result = run_quick(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, json.loads((out / "results.json").read_text())


def test_splits_are_disjoint_and_answers_valid():
    args = spin_experiment.parse_args(["--out", "unused", "--quick"])
    rows = spin_experiment.make_rows(args)
    ids = [{r["prompt_id"] for r in rows[split]} for split in ("train", "val", "test")]
    assert sum(map(len, ids)) == len(set().union(*ids)) == args.train_rows + args.val_rows + args.test_rows
    for r in rows["train"]:
        a, b = map(int, r["prompt"].split()[1:])
        assert r["messages"][1]["content"] in r["valid"] and all(str(a + b) in v for v in r["valid"])
    assert len({r["messages"][1]["content"].split()[0] == "The" for r in rows["train"]}) == 2  # forms vary


@pytest.mark.slow
def test_quick_study_runs_every_stage(quick):
    out, stdout, results = quick
    args = results["args"]
    plateau = results["plateau"]
    assert len(plateau["val_loss"]) == args["sft_epochs"] + 1
    assert plateau["theta0_epoch"] == min(range(1, len(plateau["val_loss"])), key=plateau["val_loss"].__getitem__)
    # θ0 is the SFT run of that many epochs: our evaluation of it is sft.py's own held-out loss
    # after its last epoch (two implementations agree).
    theta0_curve = [r["val_loss"] for r in map(json.loads, (out / "sft_theta0" / "metrics.jsonl").read_text().splitlines())
                    if "val_loss" in r]
    assert len(theta0_curve) == plateau["theta0_epoch"] + 1
    assert -results["theta0"]["val"]["ll_per_token"] == pytest.approx(theta0_curve[-1], rel=1e-5)
    assert plateau["theta0_val_loss"] == theta0_curve[-1]
    assert results["theta0"]["test"]["margin"] == 0.0          # θ0 against itself

    runs = results["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [("sft", s) for s in args["seeds"]] + \
        [("spin", s) for s in args["seeds"]]
    for r in runs:
        assert [p["k"] for p in r["points"]] == list(range(1, args["k"] + 1))
        assert [set(p) for p in r["points"]] == [{"k", "test"}] * (args["k"] - 1) + [{"k", "test", "val"}]
        for p in r["points"]:
            for split in set(p) - {"k"}:
                assert all(math.isfinite(p[split][m]) for m in spin_experiment.METRICS)
                assert 0 <= p[split]["exact_match"] <= 1
        if r["arm"] == "spin":
            assert len(r["pairs"]) == args["k"] and all(s["pairs"] > 0 for s in r["pairs"])
    # Every setting's numbers are the mean and spread of its seeds' runs.
    for name, entry in results["settings"].items():
        mine = [r for r in runs if spin_experiment.setting(r) == name]
        values = [r["points"][-1]["test"]["ll_per_token"] for r in mine]
        mean, std = entry["points"][-1]["test"]["ll_per_token"]
        assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(statistics.stdev(values))
    assert set(results["picks"]) == {"sft", "spin"}
    text = (out / "results.md").read_text()
    assert "| setting | k | log-lik / answer token | exact match | margin (nats) | margin > 0 |" in text
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_rerun_reuses_finished_runs(quick):
    out, _, first = quick
    result = run_quick(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4 already done)" in result.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == first["runs"] and again["theta0"] == first["theta0"]

    other = subprocess.run([sys.executable, str(REPO / "scripts" / "spin_experiment.py"), "--out", str(out), "--quick",
                            "--theta0", "plateau"], capture_output=True, text=True, timeout=300, env=study_env())
    assert other.returncode != 0 and "--theta0 annealed -> plateau" in other.stderr and "another --out" in other.stderr
