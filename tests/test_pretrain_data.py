"""pretrain/ parts that run in-process: the data mixture, the schedule, checkpoint discovery, metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.shards import write_shard
from pretrain import checkpoint, metrics
from pretrain.data import (DataError, MixtureSampler, SourceSpec, make_loader, micro_batch_indices, parse_source,
                           validation_indices)
from pretrain.schedule import lr_at


def make_source(directory, n_shards=2, n_tokens=3000, vocab=512, offset=0):
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        tokens = (np.arange(n_tokens) + offset + 10_000 * s) % vocab
        write_shard(directory / f"shard-{s:04d}.bin", tokens, vocab_size=vocab, eos_id=2, num_docs=1)
    return directory


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    # Source a holds only even ids, b only odd ones: the source of a window is visible in it.
    # Each source's two shards cut one stream (as data_prep writes them), so a window that
    # runs from one shard into the next still steps by 2.
    for name, parity in (("a", 0), ("b", 1)):
        d = root / name
        d.mkdir()
        for s in range(2):
            tokens = (np.arange(s * 2000, (s + 1) * 2000) * 2 + parity) % 512
            write_shard(d / f"shard-{s}.bin", tokens, vocab_size=512, eos_id=2, num_docs=1)
    return [SourceSpec(root / "a", 0.7), SourceSpec(root / "b", 0.3)]


def test_parse_source():
    assert parse_source("/data/slim/train:0.7") == SourceSpec(__import__("pathlib").Path("/data/slim/train"), 0.7)
    assert parse_source("/data/slim/train").weight == 1.0
    with pytest.raises(DataError, match="weight"):
        parse_source("/data/x:-1")
    with pytest.raises(DataError, match="not a number"):
        parse_source("/data/x:abc")


def test_sample_is_pure_function_of_seed_and_index(two_sources):
    a = MixtureSampler(two_sources, block_size=16, seed=7, vocab_size=512)
    b = MixtureSampler(two_sources, block_size=16, seed=7, vocab_size=512)
    for i in (0, 5, 123456789):
        assert np.array_equal(a.sample(i), b.sample(i))
        assert a.sample(i).shape == (17,)
    other = MixtureSampler(two_sources, block_size=16, seed=8, vocab_size=512)
    assert any(not np.array_equal(a.sample(i), other.sample(i)) for i in range(10))
    # Windows are contiguous slices of the source's stream, also where they cross a shard boundary.
    for i in range(200):
        assert np.all(np.diff(a.sample(i)) % 512 == 2)


def test_mixture_weights_are_respected(two_sources):
    # The shares are exact (a deterministic interleave), not only right on average.
    s = MixtureSampler(two_sources, block_size=8, seed=0, vocab_size=512)
    from_a = [int(s.sample(i)[0] % 2 == 0) for i in range(3000)]
    assert sum(from_a) == 2100 and sum(from_a[:10]) == 7 and sum(from_a[1234:1244]) == 7


def test_ranks_partition_the_global_batch():
    one = [i for m in range(4) for i in micro_batch_indices(3, m, 16, 4, rank=0, world_size=1)]
    two = [i for r in range(2) for m in range(2) for i in micro_batch_indices(3, m, 16, 4, rank=r, world_size=2)]
    assert one == two == list(range(48, 64))
    val = [list(r) for rank in range(2) for r in validation_indices(3, 2, rank, 2)]
    assert sorted(i for r in val for i in r) == list(range(12))


def test_loader_order_independent_of_workers_and_resumes(two_sources):
    sampler = MixtureSampler(two_sources, block_size=8, seed=3, vocab_size=512)
    plain = list(make_loader(sampler, 0, 8, 2, rank=0, world_size=1, max_steps=3, num_workers=0))
    workers = list(make_loader(sampler, 0, 8, 2, rank=0, world_size=1, max_steps=3, num_workers=2))
    assert len(plain) == len(workers) == 12
    for (x0, y0), (x1, y1) in zip(plain, workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are inputs shifted by one
    resumed = list(make_loader(sampler, 2, 8, 2, rank=0, world_size=1, max_steps=3, num_workers=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain[8:], resumed))


def test_shard_vocab_larger_than_model_names_the_file(tmp_path):
    make_source(tmp_path / "big", n_shards=1, vocab=1000)
    with pytest.raises(DataError, match=r"shard-0000\.bin.*vocab_size 1000.*--vocab-size"):
        MixtureSampler([SourceSpec(tmp_path / "big", 1.0)], 16, 0, vocab_size=512)
    with pytest.raises(DataError, match="does not exist"):
        MixtureSampler([SourceSpec(tmp_path / "missing", 1.0)], 16, 0, vocab_size=512)
    make_source(tmp_path / "short", n_shards=1, n_tokens=10)
    with pytest.raises(DataError, match=r"short: its shards hold 10 tokens in all, fewer than one window of 17"):
        MixtureSampler([SourceSpec(tmp_path / "short", 1.0)], 16, 0, vocab_size=512)


def test_lr_schedule():
    assert lr_at(0, 4e-4, 4e-5, 2000, 10000) == pytest.approx(4e-4 / 2000)
    assert lr_at(1999, 4e-4, 4e-5, 2000, 10000) == pytest.approx(4e-4)
    assert lr_at(6000, 4e-4, 4e-5, 2000, 10000) == pytest.approx((4e-4 + 4e-5) / 2)
    assert lr_at(10000, 4e-4, 4e-5, 2000, 10000) == pytest.approx(4e-5)
    assert lr_at(20000, 4e-4, 4e-5, 2000, 10000) == pytest.approx(4e-5)


def test_find_latest_skips_incomplete(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / checkpoint.step_dir_name(step)
        d.mkdir()
        if complete:
            (d / checkpoint.MARKER).write_text("")
    (tmp_path / ".step-000040.tmp").mkdir()
    latest, ignored = checkpoint.find_latest(tmp_path)
    assert latest.name == "step-000020"
    assert {p.name for p in ignored} == {"step-000030", ".step-000040.tmp"}
    assert checkpoint.find_latest(tmp_path / "nothing") == (None, [])


def test_metrics_logger_and_peaks(tmp_path, monkeypatch):
    log = metrics.MetricsLogger(tmp_path, enabled=True, wandb_project="p", wandb_mode="disabled")
    log.log({"loss": torch.tensor(2.5), "lr": 1e-3, "mfu": None, "bad": float("nan")}, step=3)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == \
        {"step": 3, "loss": 2.5, "lr": 1e-3, "mfu": None, "bad": "nan"}
    metrics.MetricsLogger(tmp_path / "off", enabled=False).log({"loss": 1.0}, 1)
    assert not (tmp_path / "off").exists()

    assert metrics.peak_flops_per_second("cpu") is None
    assert metrics.measure_peak_memory_gb("cpu") > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("Tesla K80", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert metrics.peak_flops_per_second("cuda:0") == peak
