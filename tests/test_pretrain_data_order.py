"""The pretraining data order (pretrain/data_order.py, pretrain/shard_stream.py and the
MixtureSampler built on them): every window once per epoch, exact mixture shares at every
prefix, a keyed permutation computed per index, and a bounded number of open files."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shards import ShardFormatError, write_shard
from pretrain.data import DataError, MixtureSampler, SourceSpec, make_loader, resolve_data_dirs
from pretrain.data_order import MAX_PERIOD, SourceInterleave, WindowPermutation

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1 << 16


def write_stream(directory: Path, lengths, first: int = 0) -> np.ndarray:
    """Shards of the given lengths cutting the stream first, first+1, ... (token = position)."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = np.arange(first, first + sum(lengths)) % VOCAB
    begin = 0
    for k, n in enumerate(lengths):
        write_shard(directory / f"part_{k:06d}.bin", stream[begin:begin + n], vocab_size=VOCAB, eos_id=2, num_docs=0)
        begin += n
    return stream


def test_one_epoch_reads_every_window_exactly_once(tmp_path):
    # Shards shorter than a window, an empty one, and windows that cross several shard boundaries.
    lengths = [50, 7, 0, 123, 16, 3, 300, 1, 61]
    stream = write_stream(tmp_path / "src", lengths)
    block = 16
    sampler = MixtureSampler([SourceSpec(tmp_path / "src", 1.0)], block, seed=5, vocab_size=VOCAB)
    n = sampler.sources[0].num_windows
    assert n == (len(stream) - 1) // block == 35

    def epoch(e):
        starts = []
        for i in range(e * n, (e + 1) * n):
            source, start = sampler.source_and_start(i)
            assert source == 0
            window = sampler.sample(i)
            # Exactly the stream's tokens: nothing padded, nothing from another place.
            assert np.array_equal(window, stream[start:start + block + 1])
            starts.append(start)
        return starts

    first, second = epoch(0), epoch(1)
    assert sorted(first) == sorted(second) == [w * block for w in range(n)]
    assert first != second  # a new key per epoch
    assert first != sorted(first)  # and a shuffled order
    # Every token but the last (len - 1) mod block is in a window; each after the first is a target once.
    targets = np.concatenate([np.arange(s + 1, s + block + 1) for s in first])
    assert np.array_equal(np.sort(targets), np.arange(1, n * block + 1))
    assert sampler.source_epochs(n) == {"epoch/0": 1.0}
    assert sampler.source_epochs(n + 7) == {"epoch/0": pytest.approx(1 + 7 / n)}


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [0.5, 0.3, 0.2], [3, 1, 1, 1],
                                     # "the most-behind source goes next" drifts past 1.35 here
                                     [7000, 3, 1164, 26, 100, 12, 7000]])
def test_interleave_counts_stay_within_one_of_the_shares(weights):
    interleave = SourceInterleave(weights)
    k, n = len(weights), max(10_000, interleave.period + 100)
    located = [interleave.locate(i) for i in range(n)]
    sources = np.array([s for s, _ in located])
    onehot = np.eye(k, dtype=np.int64)[sources]
    counts = np.vstack([np.zeros(k, np.int64), np.cumsum(onehot, axis=0)])  # counts[m] = after m samples
    # The number of earlier samples of the same source is what locate() reports.
    assert [j for _, j in located] == [int(counts[i, s]) for i, s in enumerate(sources)]
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    drift = np.abs(counts - np.arange(n + 1)[:, None] * share[None, :])
    assert drift.max() <= 1 - 1 / max(2 * k - 2, 1) + 1e-9  # Tijdeman's bound, so always < 1
    # The order repeats every period; any index is located without walking the ones before it.
    d, counts_per_period = interleave.period, interleave.counts
    for i in (0, 1, d - 1, 12_345):
        s, j = interleave.locate(i)
        assert interleave.locate(i + 10**15 * d) == (s, j + 10**15 * counts_per_period[s])
    assert interleave.samples_per_source(n) == counts[n].tolist()


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1], [0.5, 0.25], [0.123, 0.877]])
def test_two_sources_follow_bresenhams_line(weights):
    # For two sources the rule is "whoever is further behind n·w goes next" (ties to source 0):
    # source 0 has floor(n·w_0 + 1/2) of the first n samples.
    interleave = SourceInterleave(weights)
    (a, b), count = interleave.counts, 0
    assert a / (a + b) == pytest.approx(weights[0] / sum(weights))
    for i in range(10_000):
        count += interleave.locate(i)[0] == 0
        assert count == (2 * (i + 1) * a + a + b) // (2 * (a + b))
    assert SourceInterleave([0.7, 0.3]).counts == [7, 3]


def test_weights_whose_period_is_too_long_are_refused(tmp_path):
    write_stream(tmp_path / "a", [100])
    write_stream(tmp_path / "b", [100])
    with pytest.raises(DataError, match=r"--data weights.*repeats only every.*fewer digits"):
        MixtureSampler([SourceSpec(tmp_path / "a", 0.1234567), SourceSpec(tmp_path / "b", 0.5)], 8, 0, VOCAB)
    assert SourceInterleave([0.333333, 0.666667]).period <= MAX_PERIOD  # six decimals are fine
    with pytest.raises(ValueError, match="positive"):
        SourceInterleave([1.0, 0.0])


@pytest.mark.parametrize("size", [1, 2, 3, 1_000_003])
def test_window_permutation_is_a_bijection(size):
    perm = WindowPermutation(size, seed=11, source=1, epoch=4)
    image = perm.many(np.arange(size))
    assert np.array_equal(np.sort(image), np.arange(size))
    # The per-index form (what the sampler uses) is the same map.
    probe = np.unique(np.linspace(0, size - 1, num=min(size, 2000)).astype(np.int64))
    assert [perm(int(p)) for p in probe] == image[probe].tolist()
    with pytest.raises(IndexError):
        perm(size)


def test_window_permutation_keys_and_spread():
    size = 100_000
    orders = [WindowPermutation(size, seed, 0, epoch).many(np.arange(1000)) for seed, epoch in
              ((1, 0), (1, 1), (2, 0))]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    for order in orders:
        # The first 1% of an epoch is spread over the whole source, not a run of neighbours.
        assert abs(order.mean() / size - 0.5) < 0.05
        assert np.mean(np.abs(np.diff(order)) == 1) < 0.01
        assert np.histogram(order, bins=10, range=(0, size))[0].min() > 50


def test_tinyllama_default_mixture_is_seven_to_three(tmp_path):
    specs = resolve_data_dirs([], tmp_path)
    assert [(s.directory.relative_to(tmp_path).as_posix(), s.weight) for s in specs] == \
        [("slimpajama/train", 0.7), ("starcoder/train", 0.3)]
    for spec in specs:
        write_stream(spec.directory, [500, 500])
    sampler = MixtureSampler(specs, 16, seed=42, vocab_size=VOCAB)
    assert sampler.interleave.counts == [7, 3]
    assert [sampler.source_and_start(i)[0] for i in range(20)] == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0] * 2
    assert sampler.source_epochs(10) == {"epoch/0": 7 / 62, "epoch/1": 3 / 62}


def test_order_is_stateless_and_the_same_in_another_process(tmp_path):
    write_stream(tmp_path / "a", [400, 300])
    write_stream(tmp_path / "b", [250], first=5000)
    specs = [SourceSpec(tmp_path / "a", 0.7), SourceSpec(tmp_path / "b", 0.3)]
    sampler = MixtureSampler(specs, 8, seed=9, vocab_size=VOCAB)
    indices = [0, 1, 2, 99, 1000, 123_456_789, 10**12]
    forward = [sampler.source_and_start(i) for i in indices]
    assert [sampler.source_and_start(i) for i in reversed(indices)] == forward[::-1]
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pretrain.data import MixtureSampler, SourceSpec
        s = MixtureSampler([SourceSpec(Path({str(tmp_path / 'a')!r}), 0.7), SourceSpec(Path({str(tmp_path / 'b')!r}), 0.3)],
                           8, seed=9, vocab_size={VOCAB})
        print([s.source_and_start(i) for i in {indices!r}])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == repr(forward)
    # A pickled copy (a spawned loader worker) starts with no open files and reads the same windows.
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy.sources[0].stream.open_files() == 0
    assert all(np.array_equal(copy.sample(i), sampler.sample(i)) for i in indices)


def test_two_ranks_read_the_same_global_batches_as_one(tmp_path):
    write_stream(tmp_path / "a", [700])
    write_stream(tmp_path / "b", [300], first=9000)
    specs = [SourceSpec(tmp_path / "a", 0.7), SourceSpec(tmp_path / "b", 0.3)]
    sampler = MixtureSampler(specs, 8, seed=1, vocab_size=VOCAB)
    one = list(make_loader(sampler, 0, 8, 2, rank=0, world_size=1, max_steps=4, num_workers=0))
    ranks = [list(make_loader(sampler, 0, 8, 2, rank=r, world_size=2, max_steps=4, num_workers=0)) for r in range(2)]
    for step in range(4):
        whole = torch.cat([x for x, _ in one[4 * step:4 * step + 4]])
        split = torch.cat([x for r in range(2) for x, _ in ranks[r][2 * step:2 * step + 2]])
        assert torch.equal(whole, split)


def test_a_shard_truncated_during_the_run_names_the_file(tmp_path):
    write_stream(tmp_path / "a", [100, 100])
    sampler = MixtureSampler([SourceSpec(tmp_path / "a", 1.0)], 8, seed=0, vocab_size=VOCAB)
    os.truncate(tmp_path / "a" / "part_000001.bin", 64 + 2 * 10)
    with pytest.raises(ShardFormatError, match=r"part_000001\.bin: read .* bytes"):
        for i in range(sampler.sources[0].num_windows):
            sampler.sample(i)


# Runs in a child process so that the lowered descriptor limit does not touch pytest.
_FEW_FILES = """
import resource, sys
from pathlib import Path
import numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from pretrain.data import MixtureSampler, SourceSpec, make_loader
directory, shard_tokens = Path(sys.argv[1]), int(sys.argv[2])
sampler = MixtureSampler([SourceSpec(directory, 1.0)], 16, seed=3, vocab_size=1 << 16)
source = sampler.sources[0]
starts, most_open = [], 0
for i in range(source.num_windows):
    window = sampler.sample(i)
    start = sampler.source_and_start(i)[1]
    assert np.array_equal(window, np.arange(start, start + 17) % (1 << 16)), i
    starts.append(start)
    most_open = max(most_open, source.stream.open_files())
assert sorted(starts) == list(range(0, 16 * source.num_windows, 16))
batches = list(make_loader(sampler, 0, 16, 8, rank=0, world_size=1, max_steps=20, num_workers=2))
assert len(batches) == 40
print(source.num_shards, source.num_windows, most_open)
"""


@pytest.mark.slow
def test_two_thousand_shards_under_ulimit_256(tmp_path):
    shard_tokens = 40  # a window of 17 spans up to two shards
    write_stream(tmp_path / "many", [shard_tokens] * 2000)
    out = subprocess.run([sys.executable, "-c", _FEW_FILES, str(tmp_path / "many"), str(shard_tokens)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    shards, windows, most_open = map(int, out.stdout.split())
    assert (shards, windows) == (2000, (2000 * shard_tokens - 1) // 16)
    assert 1 < most_open <= 32
