"""scripts/make_local_corpus.py: a small build is in the real data-set formats (SlimPajama
jsonl.zst, StarCoder parquet, UltraChat jsonl), holds stdlib text only, keeps validation
apart from train at module level, and rebuilds byte-identically."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_local_corpus.py"
SEED, VAL_FRACTION = 3, 0.05  # 0.05 is the builder's default --val-fraction
ARGS = ["--max-mb", "0.5", "--chat-pairs", "200", "--seed", str(SEED), "--val-fraction", str(VAL_FRACTION)]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_local_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_local_corpus"] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mlc = _load_script()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    assert mlc.main(["--out", str(out), *ARGS]) == 0
    return out


def read_jsonl_zst(path: Path) -> list[dict]:
    # Stream-decompress and parse line by line, the way data_prep reads SlimPajama.
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
        text = reader.read().decode("utf-8")
    return [json.loads(line) for line in text.splitlines()]


def slimpajama(corpus: Path, split: str) -> list[dict]:
    files = sorted((corpus / "slimpajama" / split).glob("chunk*/*.jsonl.zst"))
    return [doc for f in files for doc in read_jsonl_zst(f)]


def starcoder(corpus: Path, split: str) -> list[dict]:
    files = sorted((corpus / "starcoder" / split).rglob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_slimpajama_layout_and_records(corpus):
    train_files = sorted((corpus / "slimpajama" / "train").glob("chunk*/example_train_*.jsonl.zst"))
    val_files = sorted((corpus / "slimpajama" / "validation").glob("chunk1/example_holdout_*.jsonl.zst"))
    assert len(train_files) >= 2 and len(val_files) >= 2   # several files: data_prep runs in parallel
    assert {f.parent.name for f in train_files} == {"chunk1", "chunk2"}
    for split in ("train", "validation"):
        docs = slimpajama(corpus, split)
        assert docs
        for doc in docs:
            assert set(doc) == {"text", "meta"}
            assert isinstance(doc["text"], str) and doc["text"].strip()
            assert doc["meta"]["redpajama_set_name"] in {
                "RedPajamaWikipedia", "RedPajamaBook", "RedPajamaGithub"}
    train = slimpajama(corpus, "train")
    sets = {d["meta"]["redpajama_set_name"] for d in train}
    assert {"RedPajamaWikipedia", "RedPajamaBook"} <= sets
    # Articles are made of real stdlib docstrings.
    assert any("Return" in d["text"] for d in train if d["meta"]["redpajama_set_name"] == "RedPajamaWikipedia")


def test_starcoder_parquet_holds_stdlib_sources(corpus):
    assert (corpus / "starcoder" / "train" / "python" / "train-00000-of-00002.parquet").is_file()
    for split in ("train", "validation"):
        rows = starcoder(corpus, split)
        assert rows
        for row in rows:
            assert isinstance(row["content"], str) and row["content"].strip()
            compile(row["content"], row["max_stars_repo_path"], "exec")   # parses as Python
            parts = row["max_stars_repo_path"].split("/")
            assert parts[0] == "Lib" and parts[-1].endswith(".py")
            assert not {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(parts)


def test_chat_is_ultrachat_format(corpus):
    import hashlib

    for name in ("train.jsonl", "test.jsonl"):
        lines = (corpus / "chat" / name).read_text(encoding="utf-8").splitlines()
        assert lines
        for line in lines:
            rec = json.loads(line)
            user, assistant = rec["messages"]
            assert user == {"role": "user", "content": rec["prompt"]}
            assert assistant["role"] == "assistant"
            assert 40 <= len(assistant["content"]) <= 400 and "\n" not in assistant["content"]
            assert rec["prompt_id"] == hashlib.sha256(rec["prompt"].encode()).hexdigest()
            assert "`" in rec["prompt"] and rec["prompt"].rstrip()[-1] in "?."
    summary = json.loads((corpus / "corpus_summary.json").read_text())
    assert summary["chat"]["train"]["documents"] + summary["chat"]["test"]["documents"] == 200


def test_validation_is_disjoint_from_train(corpus):
    assert not {d["text"] for d in slimpajama(corpus, "train")} & {d["text"] for d in slimpajama(corpus, "validation")}
    train_paths = {r["max_stars_repo_path"] for r in starcoder(corpus, "train")}
    val_paths = {r["max_stars_repo_path"] for r in starcoder(corpus, "validation")}
    assert not train_paths & val_paths

    def prompts(name):
        return {json.loads(x)["prompt"] for x in (corpus / "chat" / name).read_text().splitlines()}
    assert not prompts("train.jsonl") & prompts("test.jsonl")

    # The split is per module: a held-out module's source never has its docstring article
    # (first line = module name) or its chat questions in a train split.
    val_modules = {mlc.module_name(p[len("Lib/"):]) for p in val_paths}
    train_titles = {d["text"].split("\n", 1)[0] for d in slimpajama(corpus, "train")
                    if d["meta"]["redpajama_set_name"] == "RedPajamaWikipedia"}
    assert not val_modules & train_titles
    # A question belongs to the longest module name it starts with (`distutils.spawn.spawn`
    # is module distutils.spawn, split independently of the package distutils), and that
    # module's split, by the builder's own rule, must be train.
    files = mlc.list_stdlib_files(mlc.stdlib_root())
    split = {mlc.module_name(f): mlc.split_of(f"stdlib:{f}", SEED, VAL_FRACTION) for f in files}
    for q in prompts("train.jsonl"):
        name = q.split("`")[1]
        owners = [m for m in split if name.startswith(m + ".")]
        assert owners, q
        assert split[max(owners, key=len)] == "train", q


def test_budget_and_summary(corpus):
    summary = json.loads((corpus / "corpus_summary.json").read_text())
    text_bytes = sum(summary[part][s]["bytes"] for part in ("slimpajama", "starcoder")
                     for s in ("train", "validation"))
    assert 0.3e6 < text_bytes <= 0.5e6
    for part in ("slimpajama", "starcoder"):
        for split, info in summary[part].items():
            assert sorted(info["files"]) == sorted(
                p.relative_to(corpus / part).as_posix() for p in (corpus / part).rglob("*") if p.is_file()
                and p.relative_to(corpus / part).parts[0] == split)


def test_rebuild_is_byte_identical_and_drops_stale_files(corpus, tmp_path):
    # A leftover from an earlier, bigger build must not survive (data_prep would read it).
    stale = tmp_path / "slimpajama" / "train" / "chunk7" / "example_train_9.jsonl.zst"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    # Second build through the command line, as users run it.
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *ARGS],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "slimpajama" in result.stdout and "corpus_summary.json" in result.stdout
    assert not stale.exists()

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    a, b = files(corpus), files(tmp_path)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_seed_changes_the_split():
    a = {f for f in mlc.list_stdlib_files(mlc.stdlib_root()) if mlc.split_of(f, 0, 0.05) == "validation"}
    b = {f for f in mlc.list_stdlib_files(mlc.stdlib_root()) if mlc.split_of(f, 1, 0.05) == "validation"}
    assert a and b and a != b


@pytest.mark.parametrize("args, message", [
    (["--max-mb", "0"], "--max-mb must be > 0"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    assert mlc.main(["--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
