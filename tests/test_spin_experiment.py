"""scripts/spin_experiment.py (the second SFT-vs-SPIN study) and scripts/paired_stats.py: the
paired tests against hand-computed values, the task's rows, the --base-ckpt options, and
--quick end to end (every stage through the product's sft.py and spin.py, the JSON and the
table, the paired tests' counts against the per-row scores, a re-run reusing finished runs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import paired_stats  # noqa: E402
import spin_experiment  # noqa: E402


# paired_stats, by hand ----------------------------------------------------------------------
@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),                  # no discordant row: nothing to test
    (1, 5, 2 * (1 + 6) / 64),     # n = 6: P(X <= 1) = (C(6,0) + C(6,1)) / 2^6
    (5, 1, 2 * (1 + 6) / 64),     # symmetric
    (0, 10, 2 / 1024),            # all ten one way
    (3, 3, 1.0),                  # 2 P(X <= 3), n = 6, is above 1: capped
    (2, 7, 2 * (1 + 9 + 36) / 512),
])
def test_mcnemar_exact_by_hand(b, c, p):
    assert paired_stats.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_discordant_counts():
    assert paired_stats.discordant([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
    with pytest.raises(ValueError, match="3 and 2 rows"):
        paired_stats.discordant([1, 0, 1], [1, 0])


def test_paired_bootstrap_by_hand():
    # Every row differs by the same amount: the difference and both ends of the CI are it.
    same = paired_stats.paired_bootstrap([[1, 1]] * 10, [[0, 1]] * 10, resamples=500)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.5
    # Two rows, differences 0 and 1: a resampled mean is 0, 0.5 or 1 (probabilities 1/4, 1/2,
    # 1/4), so the 95% interval runs from 0 to 1 around the observed 0.5.
    two = paired_stats.paired_bootstrap([0, 1], [0, 0], resamples=4000, seed=1)
    assert (two["diff"], two["ci_low"], two["ci_high"]) == (0.5, 0.0, 1.0)
    # A 40% interval runs from the 30% to the 70% quantile: both inside the mass at 0.5.
    narrow = paired_stats.paired_bootstrap([0, 1], [0, 0], resamples=4000, seed=1, level=0.4)
    assert (narrow["ci_low"], narrow["ci_high"]) == (0.5, 0.5)
    # Seeds are averaged within a row before rows are resampled: [1, 0] vs [0, 0] is +0.5 a row.
    seeds = paired_stats.paired_bootstrap([[1, 0]] * 4, [[0, 0]] * 4, resamples=100)
    assert seeds["diff"] == 0.5 and seeds["rows"] == 4
    assert paired_stats.paired_bootstrap([0, 1, 1], [1, 0, 0], seed=3) == \
        paired_stats.paired_bootstrap([0, 1, 1], [1, 0, 0], seed=3)  # seeded


# the task ------------------------------------------------------------------------------------
def test_rows_have_one_format_and_known_wrong_answers():
    args = spin_experiment.parse_args(["--out", "unused"])
    rows = spin_experiment.make_rows(args)
    ids = [{r["prompt_id"] for r in rows[split]} for split in ("train", "val", "test")]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 800 + 1000 + 1000
    assert len(ids[1]) >= 1000  # settings are chosen on at least 1,000 val rows
    for r in rows["train"][:200] + rows["test"][:200]:
        a, b = r["a"], r["b"]
        assert r["messages"][0]["content"] == f"What is {a} plus {b}?"
        assert r["messages"][1]["content"] == f"{a} plus {b} is {a + b}."
    for r in rows["train"][:200]:
        a, b = r["a"], r["b"]
        head, wrong = r["wrong"].rsplit(" ", 1)
        assert head == f"{a} plus {b} is" and int(wrong[:-1]) - (a + b) in (-10, -1, 1, 10) and int(wrong[:-1]) >= 0
    pairs = spin_experiment.dpo_pairs(rows["train"][:3])
    assert [p["real"][1]["content"] for p in pairs] == [r["messages"][1]["content"] for r in rows["train"][:3]]
    assert [p["generated"][1]["content"] for p in pairs] == [r["wrong"] for r in rows["train"][:3]]


def test_defaults_match_arms_and_size_the_sweep():
    args = spin_experiment.parse_args(["--out", "unused"])
    assert args.iteration_steps == 800 // 32 and spin_experiment.total_steps(args) == 3 * 25
    assert args.betas == [0.3, 1.0, 3.0, 10.0] and len(args.spin_lrs) == len(args.dpo_lrs) == 3
    assert args.seeds == [0, 1, 2, 3, 4] and args.temperature == 1.0
    assert args.max_new_tokens >= 14  # "99 plus 99 is 198." + EOS is 14 tokens with split digits


def test_base_ckpt_options(tmp_path, capsys):
    base = tmp_path / "smollm2"
    base.mkdir()
    args = spin_experiment.parse_args(["--out", str(tmp_path / "o"), "--base-ckpt", str(base)])
    assert args.seeds == [0, 1, 2] and args.max_len > 64
    assert {a: (p["lr"], p["beta"]) for a, p in spin_experiment.base_picks(args).items()} == \
        {"spin": (1e-5, 0.3), "sft": (1e-4, None), "dpo": (1e-5, 0.3)}
    study = tmp_path / "results.json"
    study.write_text(json.dumps({"picks": {"spin": {"lr": 3e-5, "beta": 3.0}, "sft": {"lr": 5e-4, "beta": None},
                                           "dpo": {"lr": 1e-4, "beta": 1.0}}}))
    args = spin_experiment.parse_args(["--out", "o", "--base-ckpt", str(base), "--picks-from", str(study)])
    assert {a: (p["lr"], p["beta"]) for a, p in spin_experiment.base_picks(args).items()} == \
        {"spin": (3e-5, 3.0), "sft": (5e-4, None), "dpo": (1e-4, 1.0)}
    study.write_text("{}")
    with pytest.raises(SystemExit, match="no picks of arms"):
        spin_experiment.base_picks(args)
    for argv, message in ((["--base-ckpt", str(tmp_path / "missing")], "not a directory"),
                          (["--picks-from", str(study)], "--picks-from goes with --base-ckpt")):
        with pytest.raises(SystemExit):
            spin_experiment.parse_args(["--out", "o", *argv])
        assert message in capsys.readouterr().err


def test_a_rerun_may_extend_the_grids_but_not_change_the_study(tmp_path):
    out = str(tmp_path / "o")
    spin_experiment.check_same_study(spin_experiment.parse_args(["--out", out]))
    # a pick on the grid's edge: the same OUT takes one more lr, β and seed (its finished jobs are reused)
    spin_experiment.check_same_study(spin_experiment.parse_args(
        ["--out", out, "--spin-lrs", "1e-5,3e-5,1e-4,3e-4", "--betas", "0.1,0.3,1,3,10", "--seeds", "0,1,2,3,4,5"]))
    assert json.loads((tmp_path / "o" / "study_args.json").read_text())["betas"] == [0.1, 0.3, 1, 3, 10]
    for flags, message in ((["--train-rows", "1500"], "--train-rows 800 -> 1500"),
                           (["--k", "2"], "--k 3 -> 2")):
        with pytest.raises(SystemExit, match=message):
            spin_experiment.check_same_study(spin_experiment.parse_args(["--out", out, *flags]))


# --quick end to end --------------------------------------------------------------------------
def run_quick(out: Path, *extra) -> subprocess.CompletedProcess:
    # The study runs two trainings at a time: one MASTER_PORT (conftest's reserved port) for both
    # would collide, so each gets the free port Lightning picks for a run without one.
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "spin_experiment.py"), "--out", str(out), "--quick",
                           *extra], capture_output=True, text=True, timeout=1200, env=env)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    result = run_quick(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_study_runs_every_stage(quick):
    out, stdout, results = quick
    args = results["args"]
    # θ0 (--theta0 plateau) is the scan's checkpoint at its lowest val loss: its val log-likelihood
    # per answer token is sft.py's own held-out loss after that epoch (two implementations agree).
    scan_metrics = (out / "sft_plateau_scan" / "metrics.jsonl").read_text().splitlines()
    scan = [r["val_loss"] for r in map(json.loads, scan_metrics) if "val_loss" in r]
    assert results["plateau"]["theta0"] == "plateau" and scan == results["plateau"]["val_loss"]
    theta0_epoch = results["plateau"]["theta0_epoch"]
    assert -results["theta0"]["val"]["ll_per_token"] == pytest.approx(scan[theta0_epoch], rel=1e-5)
    runs = results["runs"]
    # the sweep's cells at seed 0, then each arm's pick at every seed
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted((a, s) for a in ("dpo", "sft", "spin")
                                                                 for s in args["seeds"])
    steps = args["k"] * args["iteration_steps"]
    for r in runs:
        metrics = [json.loads(l) for l in (out / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()]
        trained = [m for m in metrics if "grad_norm" in m]
        assert len(trained) == steps, r["name"]  # arms matched in optimizer steps
        assert len(r["test"]["correct"]) == args["test_rows"] and 0 <= r["test"]["accuracy"] <= 1
        assert r["test"]["accuracy"] == sum(r["test"]["correct"]) / args["test_rows"]
        if r["arm"] == "spin":
            assert len(r["test_by_iteration"]) == args["k"] and r["test_by_iteration"][-1] == r["test"]["accuracy"]
            assert all("dropped_capped" in p for p in r["pairs"])
    # Each paired test's McNemar counts are the discordant rows of the two models' per-row scores.
    by = {(r["arm"], r["seed"]): r["test"]["correct"] for r in runs}
    theta0 = results["theta0"]["test"]["correct"]
    assert [(t["a"], t["b"]) for t in results["tests"]] == list(spin_experiment.COMPARISONS)
    for t in results["tests"]:
        for m in t["mcnemar"]:
            a = theta0 if t["a"] == "theta0" else by[(t["a"], m["seed"])]
            b = theta0 if t["b"] == "theta0" else by[(t["b"], m["seed"])]
            assert (m["a_only"], m["b_only"]) == (sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b)))
        mean_a = sum(sum(by[(t["a"], s)]) if t["a"] != "theta0" else sum(theta0) for s in args["seeds"])
        mean_b = sum(sum(by[(t["b"], s)]) if t["b"] != "theta0" else sum(theta0) for s in args["seeds"])
        assert t["diff"] == pytest.approx((mean_a - mean_b) / len(args["seeds"]) / args["test_rows"])
        assert t["ci_low"] <= t["diff"] <= t["ci_high"]
    assert set(results["picks"]) == {"spin", "sft", "dpo"}
    text = (out / "results.md").read_text()
    for header in ("| arm | lr | β | val accuracy | val log-lik / token |",
                   "| model | test accuracy | well-formed | test log-lik / token | val accuracy |",
                   "| A − B | difference | CI | McNemar p per seed (A only / B only) |"):
        assert header in text
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_rerun_reuses_finished_runs(quick):
    out, _, first = quick
    result = run_quick(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(0 already done)" not in result.stdout and "3 runs (3 already done)" in result.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == first["runs"] and again["tests"] == first["tests"]
    other = run_quick(out, "--theta0", "annealed")
    assert other.returncode != 0 and "--theta0 plateau -> annealed" in other.stderr and "another --out" in other.stderr
