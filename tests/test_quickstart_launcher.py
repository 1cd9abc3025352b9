"""The quickstart finds the `fabric` launcher of the python running it (a virtual
environment's python run without activating it, as cron jobs and IDEs do) and, when there is
none, stops before any stage with exit 2 and a message that says how to install it."""
import os
import sys
from pathlib import Path

from conftest import load_script


def test_the_launcher_beside_the_interpreter_is_found_without_path(monkeypatch):
    quickstart = load_script("quickstart")
    monkeypatch.setenv("PATH", "")
    assert quickstart.fabric_launcher() == str(Path(sys.executable).parent / "fabric")


def test_a_missing_launcher_is_exit_2_before_any_stage(monkeypatch, tmp_path, capsys):
    quickstart = load_script("quickstart")
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setattr(sys, "executable", str(bare / "python"))
    monkeypatch.setenv("PATH", str(bare))
    out = tmp_path / "out"
    assert quickstart.main(["--size", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the Lightning launcher `fabric` is neither beside {bare / 'python'} nor on PATH" in err
    assert "pip install -e ." in err
    assert not (out / "corpus").exists()  # no stage ran


def test_a_launcher_on_path_is_used_when_none_is_beside_the_interpreter(monkeypatch, tmp_path):
    quickstart = load_script("quickstart")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "fabric").write_text("#!/bin/sh\n")
    (elsewhere / "fabric").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(elsewhere) + os.pathsep + "/nonexistent")
    assert quickstart.fabric_launcher() == str(elsewhere / "fabric")
