"""SPIN resumed after each of its stages (generation part-way, generation, pairs, reference
log-probs) continues to exactly what an uninterrupted run produces; a second invocation with
more iterations continues into iteration 1 and trains on both iterations' pairs."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_spin_e2e import chat_file, run_cli, tiny_ckpt  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

ARGS = ["--num-prompts", 16, "--max-new-tokens", 8, "--max-prompt-len", 32, "--max-len", 64, "--gen-batch-size", 4,
        "--global-batch-size", 8, "--micro-batch-size", 4, "--epochs", 1, "--schedule-epochs", 1, "--lr", 1e-4,
        "--no-progress", "--temperature", 1.0, "--seed", 3]


def spin(ckpt, data, out, iterations):
    r = run_cli("spin.py", "--ckpt", ckpt, "--data", data, "--out", out, "--iterations", iterations, *ARGS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, chat_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("spin") / "straight"
    spin(tiny_ckpt, chat_file, out, 1)
    return out


def rewind(src, dst, keep):
    """`dst`: `src` as a run that crashed in iteration 0 with only the work files in `keep` written."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "iter1")
    (dst / "state.json").unlink()
    work = dst / "work" / "iter0"
    for path in list(work.iterdir()):
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("crash_after", ["part of generation", "generation", "pairs", "reference log-probs"])
def test_resume_after_each_stage_equals_the_uninterrupted_run(uninterrupted, tiny_ckpt, chat_file,  # noqa: F811
                                                              tmp_path, crash_after):
    keep = {"part of generation": {"generations.rank0.jsonl"},
            "generation": {"generations.rank0.jsonl", "generations.jsonl"},
            "pairs": {"generations.rank0.jsonl", "generations.jsonl", "pairs.jsonl", "pairs_stats.json"},
            "reference log-probs": {"generations.rank0.jsonl", "generations.jsonl", "pairs.jsonl",
                                    "pairs_stats.json", "ref_logps.pt"}}[crash_after]
    out = tmp_path / "resumed"
    rewind(uninterrupted, out, keep)
    part = out / "work" / "iter0" / "generations.rank0.jsonl"
    if crash_after == "part of generation":
        rows = part.read_text().splitlines(keepends=True)
        part.write_text("".join(rows[:6]) + rows[6][:10])  # 6 rows and a torn 7th, as a kill leaves them
    stdout = spin(tiny_ckpt, chat_file, out, 1)
    if crash_after == "part of generation":
        assert "generated 10 answers this run" in stdout
    for name in ("generations.jsonl", "pairs.jsonl", "pairs_stats.json"):
        assert (out / "work" / "iter0" / name).read_text() == (uninterrupted / "work" / "iter0" / name).read_text()
    a, b = load_file(str(uninterrupted / "iter1" / "model.safetensors")), load_file(str(out / "iter1" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "state.json").read_text()) == json.loads((uninterrupted / "state.json").read_text())


def test_a_second_invocation_continues_into_iteration_1_with_previous_pairs(uninterrupted, tiny_ckpt,  # noqa: F811
                                                                            chat_file, tmp_path):  # noqa: F811
    out = tmp_path / "more"
    shutil.copytree(uninterrupted, out)
    stdout = spin(tiny_ckpt, chat_file, out, 2)
    assert "resuming after 1 completed iteration(s)" in stdout
    assert (out / "iter2" / "model.safetensors").is_file()
    assert json.loads((out / "state.json").read_text())["completed_iterations"] == 2
    ref = torch.load(out / "work" / "iter1" / "ref_logps.pt")
    sources = [key[0] for key in ref["keys"]]
    pairs0 = len((out / "work" / "iter0" / "pairs.jsonl").read_text().splitlines())
    pairs1 = len((out / "work" / "iter1" / "pairs.jsonl").read_text().splitlines())
    assert sources.count(0) == pairs0 and sources.count(1) == pairs1  # iteration 0's pairs are trained on again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one step count across the two invocations
