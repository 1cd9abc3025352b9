"""data_prep end to end: tiny corpora written in the real formats (SlimPajama .jsonl.zst,
StarCoder parquet) are tokenized, read back with iter_documents and decoded; the output
must be the same bytes for any worker count and after an interrupted run is resumed.

The corpus writers here are also used by test_data_prep_bad_input.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from conftest import LLAMA2_TOKENIZER, REPO, run_main, synthetic_text
from data_prep import iter_documents, list_shards, read_header, read_shard
from data_prep.errors import DataPrepError
from data_prep.pipeline import Job, run
from data_prep.shards import ShardFormatError

SHARD_TOKENS = 150  # small, so documents cross shard boundaries and inputs span shards

# ---------------------------------------------------------------- corpus writers


def write_jsonl_zst(path: Path, lines: list) -> Path:
    """One line per item: dicts as JSON, bytes as they are (to write broken lines)."""
    raw = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    return path


def sp_doc(text: str, set_name: str = "RedPajamaC4") -> dict:
    return {"text": text, "meta": {"redpajama_set_name": set_name}}


def documents(n: int, seed: int) -> list[str]:
    """Multi-line documents, some with non-ASCII text and leading/trailing whitespace."""
    lines = synthetic_text(3 * n, seed)
    docs = ["\n".join(lines[3 * i:3 * i + 3]) for i in range(n)]
    docs[0] = "Ärger über naïve café — 日本語 ✓ 🙂\n\tindented line"
    docs[-1] = docs[-1] + "\n\n"
    return docs


def write_slimpajama(root: Path) -> list[str]:
    """A train split of 2 chunks x 2 files (+ a validation file); returns the kept texts
    in the order the output must hold them (files by path, then line order)."""
    kept = []
    for c, chunk in enumerate(("chunk1", "chunk2")):
        for f in range(2):
            docs = documents(12, seed=10 * c + f)
            lines = []
            for i, text in enumerate(docs):
                set_name = "RedPajamaGithub" if i % 5 == 2 else ("RedPajamaWikipedia" if i % 2 else "RedPajamaC4")
                lines.append(sp_doc(text, set_name))
                if set_name != "RedPajamaGithub":
                    kept.append(text)
            write_jsonl_zst(root / "train" / chunk / f"example_train_{f}.jsonl.zst", lines)
    write_jsonl_zst(root / "validation" / "chunk1" / "example_holdout_0.jsonl.zst",
                    [sp_doc(t) for t in documents(5, seed=99)])
    return kept


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_starcoder(root: Path) -> list[str]:
    """Two languages, several files, several row groups each; returns the texts in order."""
    kept = []
    for lang, n_files in (("python", 2), ("java", 1)):
        for f in range(n_files):
            code = [f"// {lang} file {f}\n" + t for t in documents(11, seed=10 * len(lang) + f)]
            table = pa.table({"max_stars_repo_path": [f"src/{i}.x" for i in range(len(code))], "content": code})
            write_parquet(root / lang / f"train-{f:05d}-of-{n_files:05d}.parquet", table)
    for lang, n_files in (("java", 1), ("python", 2)):  # the output order: sorted by path
        for f in range(n_files):
            kept += pq.read_table(root / lang / f"train-{f:05d}-of-{n_files:05d}.parquet")["content"].to_pylist()
    return kept


# ---------------------------------------------------------------- helpers


def tokenize(source: str, root: Path, out: Path, tokenizer: Path, **kw) -> dict:
    kw.setdefault("shard_tokens", SHARD_TOKENS)
    kw.setdefault("split", "train" if source == "slimpajama" else None)
    return run(Job(source=source, input_root=root, output=out, tokenizer=tokenizer, progress=False, **kw))


def cli(source: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as users do: as a file, from the repository root."""
    script = REPO / "data_prep" / f"tokenize_{source}.py"
    return subprocess.run([sys.executable, str(script), "--no-progress", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def cli_refused(source: str, *args) -> subprocess.CompletedProcess:
    """The CLI's main(argv) in this process (conftest.run_main), for runs refused before any work."""
    import importlib

    return run_main(importlib.import_module(f"data_prep.tokenize_{source}").main, "--no-progress", *args)


def decoded(out: Path, tokenizer: Path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return [sp.decode(doc.tolist()) for doc in iter_documents(out)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shards(out)}


def comparable(summary: dict) -> dict:
    """The summary without what legitimately differs between equivalent runs."""
    return {k: v for k, v in summary.items() if k not in ("seconds", "workers", "resumed", "already_complete")}


def assert_no_partial_output(out: Path) -> None:
    assert list_shards(out) == [], "shards of an unfinished run must not be visible"
    assert not (out / "summary.json").exists()
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory):
    root = tmp_path_factory.mktemp("slimpajama")
    return root, write_slimpajama(root)


@pytest.fixture(scope="module")
def starcoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("starcoder")
    return root, write_starcoder(root)


@pytest.fixture(scope="module")
def slimpajama_clean(slimpajama, tiny_tokenizer, tmp_path_factory):
    """One clean --workers 2 run, the reference for the other tests."""
    root, _ = slimpajama
    out = tmp_path_factory.mktemp("clean") / "slimpajama_train"
    summary = tokenize("slimpajama", root, out, tiny_tokenizer, workers=2)
    return out, summary


def test_slimpajama_round_trip_and_worker_count_invariance(slimpajama, slimpajama_clean, tiny_tokenizer, tmp_path):
    root, kept = slimpajama
    out2, summary2 = slimpajama_clean
    assert decoded(out2, tiny_tokenizer) == kept  # every kept document, exactly, in order
    assert summary2["excluded_documents"] == {"RedPajamaGithub": 4 * 2}
    assert summary2["skipped_documents"] == {}
    assert (summary2["files"], summary2["documents"]) == (4, len(kept))

    # the CLI, run as a file with one worker, writes the very same bytes
    out1 = tmp_path / "w1"
    result = cli("slimpajama", "--input", root, "--output", out1, "--tokenizer", tiny_tokenizer,
                 "--workers", 1, "--shard-tokens", SHARD_TOKENS)
    assert result.returncode == 0, result.stderr
    assert "4 files" in result.stdout
    assert shard_bytes(out1) == shard_bytes(out2)
    summary1 = json.loads((out1 / "summary.json").read_text())
    assert comparable(summary1) == comparable(summary2)

    # shards: fixed size except the last, headers consistent, counts add up
    paths = list_shards(out2)
    assert [p.name for p in paths] == [f"slimpajama_train_{i:06d}.bin" for i in range(len(paths))]
    headers = [read_header(p) for p in paths]
    assert all(h.num_tokens == SHARD_TOKENS for h in headers[:-1]) and 0 < headers[-1].num_tokens <= SHARD_TOKENS
    assert sum(h.num_tokens for h in headers) == summary2["tokens"]
    assert sum(h.num_docs for h in headers) == summary2["documents"]
    assert {(h.dtype, h.vocab_size, h.eos_id) for h in headers} == {(np.dtype("<u2"), 512, 2)}
    stream = np.concatenate([read_shard(p) for p in paths])
    assert stream[-1] == 2 and (stream == 2).sum() == len(kept)  # tokens + EOS per document
    assert stream[0] != 1  # no BOS: documents are separated by EOS only


def test_validation_split_and_rerun_is_idempotent(slimpajama, slimpajama_clean, tiny_tokenizer, tmp_path):
    root, _ = slimpajama
    out = tmp_path / "val"
    summary = tokenize("slimpajama", root, out, tiny_tokenizer, split="validation", workers=1)
    assert summary["files"] == 1 and decoded(out, tiny_tokenizer) == documents(5, seed=99)
    assert list_shards(out)[0].name.startswith("slimpajama_validation_")

    # a finished output: re-running changes nothing; a different job is refused
    out_train, _ = slimpajama_clean
    before = {p.name: p.stat().st_mtime_ns for p in out_train.iterdir()}
    again = tokenize("slimpajama", root, out_train, tiny_tokenizer, workers=2)
    assert again["already_complete"] and {p.name: p.stat().st_mtime_ns for p in out_train.iterdir()} == before
    with pytest.raises(DataPrepError, match="already holds a finished run"):
        tokenize("slimpajama", root, out_train, tiny_tokenizer, shard_tokens=SHARD_TOKENS * 2)


def test_starcoder_round_trip_and_worker_count_invariance(starcoder, tiny_tokenizer, tmp_path):
    root, kept = starcoder
    s1 = tokenize("starcoder", root, tmp_path / "w1", tiny_tokenizer, workers=1)
    s2 = tokenize("starcoder", root, tmp_path / "w2", tiny_tokenizer, workers=2)
    assert decoded(tmp_path / "w2", tiny_tokenizer) == kept
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert comparable(s1) == comparable(s2)
    assert s2["files"] == 3 and s2["documents"] == len(kept)
    assert list_shards(tmp_path / "w1")[0].name == "starcoder_000000.bin"


def test_starcoder_binary_content_column(tiny_tokenizer, tmp_path):
    texts = ["def f():\n    return 1\n", "print('ünïcode')"]
    write_parquet(tmp_path / "in" / "python" / "a.parquet",
                  pa.table({"content": pa.array([t.encode() for t in texts], type=pa.binary())}))
    tokenize("starcoder", tmp_path / "in", tmp_path / "out", tiny_tokenizer)
    assert decoded(tmp_path / "out", tiny_tokenizer) == texts


@pytest.mark.parametrize("kill_after", ["input:1", "shard:5", "published:2"])
def test_interrupted_run_resumes_to_the_same_output(slimpajama, slimpajama_clean, tiny_tokenizer, tmp_path,
                                                    kill_after):
    root, _ = slimpajama
    out = tmp_path / "out"
    args = ("--input", root, "--output", out, "--tokenizer", tiny_tokenizer, "--shard-tokens", SHARD_TOKENS)
    killed = cli("slimpajama", *args, "--workers", 1, env={"DATA_PREP_TEST_KILL_AFTER": kill_after})
    assert killed.returncode == -9, killed.stderr  # SIGKILL: nothing got to clean up
    assert not (out / "summary.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    if not kill_after.startswith("published"):
        assert list_shards(out) == []  # committed shards wait in .work until the run is complete
    with pytest.raises(ShardFormatError, match="unfinished run"):
        next(iter_documents(out))

    resumed = cli("slimpajama", *args, "--workers", 2)
    assert resumed.returncode == 0, resumed.stderr
    clean_out, clean_summary = slimpajama_clean
    assert shard_bytes(out) == shard_bytes(clean_out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and comparable(summary) == comparable(clean_summary)
    assert not (out / ".work").exists()


def test_resume_refuses_changed_settings(slimpajama, tiny_tokenizer, tmp_path):
    root, _ = slimpajama
    out = tmp_path / "out"
    args = ("--input", root, "--output", out, "--tokenizer", tiny_tokenizer, "--workers", 1)
    killed = cli("slimpajama", *args, "--shard-tokens", SHARD_TOKENS, env={"DATA_PREP_TEST_KILL_AFTER": "shard:1"})
    assert killed.returncode == -9
    other = cli("slimpajama", *args, "--shard-tokens", SHARD_TOKENS + 1)
    assert other.returncode == 2
    assert f"shard_tokens: was {SHARD_TOKENS}, now {SHARD_TOKENS + 1}" in other.stderr
    assert str(out / ".work") in other.stderr  # the message says what to delete to start over


def test_missing_tokenizer_is_a_clear_error(slimpajama, tmp_path):
    root, _ = slimpajama
    result = cli_refused("slimpajama", "--input", root, "--output", tmp_path / "o", "--tokenizer",
                         tmp_path / "nope.model")
    assert result.returncode == 2
    assert "nope.model does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def _edited_tokenizer(tiny_tokenizer: Path, path: Path, edit) -> Path:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(tiny_tokenizer.read_bytes())
    edit(proto, model_pb2)
    path.write_bytes(proto.SerializeToString())
    return path


def test_vocabulary_beyond_uint16(starcoder, tiny_tokenizer, tmp_path):
    def grow(proto, model_pb2):  # 70,512 pieces: ids no longer fit uint16
        for i in range(70_000):
            proto.pieces.add(piece=f"<extra_{i}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)

    big = _edited_tokenizer(tiny_tokenizer, tmp_path / "big.model", grow)
    root, kept = starcoder
    with pytest.raises(DataPrepError, match=r"70512 pieces.*do not fit --dtype uint16"):
        tokenize("starcoder", root, tmp_path / "o16", big, dtype="uint16")
    summary = tokenize("starcoder", root, tmp_path / "o32", big)  # auto -> uint32
    assert summary["dtype"] == "uint32" and read_header(list_shards(tmp_path / "o32")[0]).dtype == np.dtype("<u4")
    assert decoded(tmp_path / "o32", big) == kept


def test_tokenizer_without_eos_is_refused(starcoder, tiny_tokenizer, tmp_path):
    no_eos = _edited_tokenizer(tiny_tokenizer, tmp_path / "no_eos.model",
                               lambda proto, _: setattr(proto.trainer_spec, "eos_piece", "<none>"))
    with pytest.raises(DataPrepError, match="defines no EOS piece"):
        tokenize("starcoder", starcoder[0], tmp_path / "o", no_eos)


def test_train_tokenizer_is_llama_style(tmp_path):
    from data_prep.train_tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_text(1500, seed=3)) + "\nnaïve ✓\n", encoding="utf-8")
    model = train_tokenizer([corpus], tmp_path / "tok", vocab_size=400, character_coverage=1.0, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (400, 0, 1, 2, -1)
    text = "Unseen: 日本語 ✓ x=12345\n\ttab"
    assert sp.decode(sp.encode(text)) == text  # byte fallback: no <unk>, whitespace kept
    assert 0 not in sp.encode(text)


@pytest.mark.skipif(not LLAMA2_TOKENIZER.exists(), reason="Llama-2 tokenizer not in ../shared/data")
def test_llama2_tokenizer(starcoder, tmp_path):
    root, kept = starcoder
    summary = tokenize("starcoder", root, tmp_path / "o", LLAMA2_TOKENIZER, workers=2)
    assert summary["tokenizer"]["vocab_size"] == 32000 and summary["dtype"] == "uint16"
    assert decoded(tmp_path / "o", LLAMA2_TOKENIZER) == kept


def test_zst_reader_frames_and_line_ends(tmp_path):
    from data_prep.errors import BadInputReport
    from data_prep.slimpajama import read_documents

    def lines(path, skip_bad=False):
        return [text for _, text in read_documents(path, BadInputReport(str(path), skip_bad))]

    compress = zstandard.ZstdCompressor().compress
    two_frames = tmp_path / "two_frames.jsonl.zst"  # e.g. files appended to; the last line has no newline
    two_frames.write_bytes(compress(b'{"text": "a"}\n{"text": "b"}\n') + compress(b'{"text": "c"}'))
    assert lines(two_frames) == ["a", "b", "c"]

    # a truncated stream: only lines decoded completely before the cut are data
    big = [json.dumps({"text": f"document {i} " * 20}).encode() for i in range(3000)]
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor(level=1).compress(b"\n".join(big) + b"\n")[:-5000])
    report = BadInputReport(str(cut), skip_bad=True)
    got = [text for _, text in read_documents(cut, report)]
    assert 0 < len(got) < len(big) and got == [json.loads(b)["text"] for b in big[:len(got)]]
    assert report.skipped == {"truncated_zst": 1}

    empty = tmp_path / "empty.jsonl.zst"
    empty.write_bytes(b"")
    with pytest.raises(Exception, match="truncated_zst"):
        lines(empty)
    empty.write_bytes(compress(b""))  # a valid frame holding nothing: no documents, no error
    assert lines(empty) == []
