"""scripts/bench_loader.py: a small run measures every mode on both generated mixtures and on
--data, and writes the rows it prints (no timing is asserted, docs/design.md rule 8)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import write_shard

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_loader.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_loader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_loader_small_run(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert _load().main(["--shards", "6", "--shard-tokens", "300", "--block-size", "32", "--micro-batch", "4",
                         "--seconds", "0.05", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["mixture"], r["shards"], r["mode"]) for r in rows] == [
        (mixture, shards, mode) for mixture, shards in (("many small shards", 12), ("4 large shards", 8))
        for mode in ("order only", "in process", "1 worker")]
    assert all(r["windows_per_sec"] > 0 and r["tokens_per_sec"] == pytest.approx(32 * r["windows_per_sec"])
               for r in rows)
    assert "windows/s" in capsys.readouterr().out


def test_bench_loader_on_given_data(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(500) % 100, vocab_size=100, eos_id=2, num_docs=0)
    out = tmp_path / "rows.json"
    assert _load().main(["--data", f"{tmp_path}:1", "--block-size", "16", "--seconds", "0.05",
                         "--json", str(out)]) == 0
    assert [r["mode"] for r in json.loads(out.read_text())] == ["order only", "in process", "1 worker"]


def test_bench_loader_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as e:
        _load().main(["--block-size", "0"])
    assert e.value.code == 2 and "--block-size must be at least 1" in capsys.readouterr().err
