"""--sharding fsdp|hsdp|ddp on CPU (gloo): the same losses in every mode, checkpoints that load in
any mode and on any world size, and a 2-node launch equal to one node with 2 processes.

Every run reads the same global batches from the same initial weights (both depend on --seed
only); the modes and world sizes differ only in float summation order, so losses agree within
1e-5 (measured: about 1e-7 after 6 steps of the tiny model).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import fabric_run, run_main
from pretrain.parallel import mesh_shape
from test_pretrain_run import base_args, env, learnable_corpus, losses, run

REPO = Path(__file__).resolve().parents[1]
FABRIC = str(Path(sys.executable).parent / "fabric")
STEPS = 6
TOLERANCE = 1e-5


def args_for(data: Path, out: Path, *extra) -> list[str]:
    """test_pretrain_run's tiny run, shortened to 6 steps with checkpoints at 3 and 6."""
    args = base_args(data, out, *extra)
    for flag, value in (("--max-steps", STEPS), ("--save-every", 3), ("--warmup-steps", 2)):
        args[args.index(flag) + 1] = str(value)
    return args


def on(devices: int) -> list[str] | None:
    """The launcher for `devices` CPU processes on one node (None: a plain `python` process)."""
    return None if devices == 1 else fabric_run("--accelerator", "cpu", "--devices", devices)


def assert_same_losses(expected: dict[int, float], got: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(expected[step] - got[step]) < TOLERANCE, (step, expected[step], got[step])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    learnable_corpus(root / "a", 0, n_tokens=6000)
    learnable_corpus(root / "b", 1, n_tokens=6000)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """The three modes on 2 processes, 6 steps each, checkpoints at steps 3 and 6."""
    outs = {}
    for mode in ("fsdp", "hsdp", "ddp"):
        out = tmp_path_factory.mktemp(mode)
        proc = run(args_for(data, out, "--sharding", mode), out, launcher=on(2))
        outs[mode] = out
        outs[mode + "-stdout"] = proc.stdout
    # ...and one process with --fsdp-mode keep, whose checkpoints the tests load elsewhere
    out = tmp_path_factory.mktemp("keep-on-1")
    outs["keep-on-1-stdout"] = run(args_for(data, out, "--fsdp-mode", "keep"), out).stdout
    outs["keep-on-1"] = out
    return outs


@pytest.mark.slow
def test_the_three_modes_give_the_same_losses(runs):
    # Each mode really ran as asked: the mesh printed at start, stored in config.yaml, and
    # what rank 0 holds (half of the 158,016 elements when sharded over 2, all of them in ddp).
    expected_mesh = {"fsdp": "fsdp (FSDP2, shard 2) over 2 rank(s): rank 0 holds 79,008 of",
                     "hsdp": "hsdp (FSDP2, replicate 1 x shard 2) over 2 rank(s): rank 0 holds 79,008 of",
                     "ddp": "ddp (FSDP2, replicate 2 x shard 1) over 2 rank(s): rank 0 holds 158,016 of"}
    for mode, text in expected_mesh.items():
        assert f"sharding: {text}" in runs[mode + "-stdout"]
        saved = yaml.safe_load((runs[mode] / "config.yaml").read_text())
        assert saved["options"]["sharding"] == mode and saved["resolved"]["sharding"].startswith(text)
    reference = losses(runs["fsdp"])
    for mode in ("hsdp", "ddp", "keep-on-1"):
        assert_same_losses(reference, losses(runs[mode]), range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("saved_by, devices, resume_args", [
    ("fsdp", 2, ["--sharding", "ddp"]),                        # another mode, same world size
    ("hsdp", 1, []),                                           # 2 processes -> 1 (fsdp)
    ("ddp", 4, ["--sharding", "hsdp", "--shard-size", "2"]),   # 2 -> 4, a real 2 x 2 hybrid mesh
    ("fsdp", 1, ["--fsdp-mode", "keep"]),                      # 2 processes -> 1 keeping gathered weights
    ("keep-on-1", 2, ["--sharding", "fsdp"]),                  # saved by --fsdp-mode keep on 1 -> shard on 2
], ids=["fsdp-to-ddp-on-2", "hsdp-on-2-to-1", "ddp-on-2-to-hsdp-on-4", "fsdp-on-2-to-keep-on-1",
        "keep-on-1-to-shard-on-2"])
def test_a_checkpoint_resumes_in_another_mode_and_world_size(runs, data, tmp_path, saved_by, devices, resume_args):
    out = tmp_path / "resumed"
    checkpoint = runs[saved_by] / "checkpoints" / "step-000003"
    proc = run(args_for(data, out, "--resume", str(checkpoint), *resume_args), tmp_path, launcher=on(devices))
    assert f"resumed from {checkpoint} at step 3" in proc.stdout
    if devices == 4:
        # shard groups of 2: each rank holds half, as on 2 processes; the halves are replicated twice
        assert "hsdp (FSDP2, replicate 2 x shard 2) over 4 rank(s): rank 0 holds 79,008 of" in proc.stdout
    assert_same_losses(losses(runs["fsdp"]), losses(out), range(4, STEPS + 1))


def readme_two_node_commands() -> list[list[str]]:
    """The two `fabric run --num-nodes 2` commands of the README, as argument lists."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines()
                if line.startswith("fabric run --accelerator cpu --devices 1 --num-nodes 2")]
    assert len(commands) == 2, "README.md should show the two launchers of the one-machine 2-node run"
    return commands


@pytest.mark.slow
def test_two_node_launch_equals_one_node_with_two_processes(runs, data, tmp_path):
    """The README's two `fabric run` launchers (node ranks 0 and 1, one process each, loopback
    address), with this test's reserved port and this test's tiny run, against the 1-node 2-process run."""
    out = tmp_path / "two-nodes"
    port = os.environ["MASTER_PORT"]  # this test's reserved port (conftest.master_port)
    procs = []
    for node_rank, command in enumerate(readme_two_node_commands()):
        assert command[command.index("--node-rank") + 1] == str(node_rank)
        command[command.index("--main-port") + 1] = port
        script = command.index("pretrain/tinyllama.py")
        cmd = [FABRIC, *command[1:script], str(REPO / command[script]), *command[script + 1:],
               *args_for(data, out)]  # later flags override the README's placeholders (DATA, runs/)
        procs.append(subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=tmp_path))
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            outputs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for code, stdout, stderr in outputs:
        assert code == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    # The default --sharding hsdp shards within a node (here: 1 process) and replicates across the 2 nodes.
    assert "hsdp (FSDP2, replicate 2 x shard 1) over 2 rank(s)" in outputs[0][1]
    assert_same_losses(losses(runs["fsdp"]), losses(out), range(1, STEPS + 1))


def test_shard_size_is_checked():
    assert mesh_shape("fsdp", 8, 4, None) == (1, 8)
    assert mesh_shape("ddp", 8, 4, None) == (8, 1)
    assert mesh_shape("hsdp", 8, 4, None) == (2, 4)   # default: the processes of a node
    assert mesh_shape("hsdp", 8, 4, 2) == (4, 2)
    with pytest.raises(ValueError, match="--shard-size 3 must divide the world size 8"):
        mesh_shape("hsdp", 8, 4, 3)


def test_shard_size_without_hsdp_is_bad_input(data, tmp_path):
    from pretrain import tinyllama

    proc = run_main(tinyllama.main, *args_for(data, tmp_path / "out", "--sharding", "fsdp", "--shard-size", "2"))
    assert proc.returncode == 2
    assert "--shard-size applies to --sharding hsdp only (got --sharding fsdp)" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_shard_size_that_does_not_divide_the_world_is_an_error(data, tmp_path):
    proc = run(args_for(data, tmp_path / "out", "--shard-size", "3"), tmp_path, launcher=on(2), check=False)
    assert proc.returncode != 0
    assert "error: --shard-size 3 must divide the world size 2 (given); pass a divisor of 2" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
