"""Bad input never corrupts the output silently: by default the run stops with an error
naming the file and line (or row), exits non-zero and leaves no shard behind; with
--skip-bad each case is skipped and counted by reason in summary.json."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from data_prep import list_shards
from data_prep.errors import BadInputError
from test_data_prep import (SHARD_TOKENS, assert_no_partial_output, cli, decoded, documents, sp_doc, tokenize,
                            write_jsonl_zst, write_parquet)

GOOD = documents(8, seed=5)  # a clean first file, so shards are committed before the bad one


def truncate(path, cut: int = 9):
    path.write_bytes(path.read_bytes()[:-cut])
    return path


def slimpajama_with(root, bad_lines: list) -> str:
    """chunk1/a is clean, chunk1/b holds `bad_lines` after two good documents.
    Returns b's path relative to `root`."""
    write_jsonl_zst(root / "train/chunk1/a.jsonl.zst", [sp_doc(t) for t in GOOD])
    write_jsonl_zst(root / "train/chunk1/b.jsonl.zst", [sp_doc("fine one"), sp_doc("fine two"), *bad_lines])
    return "train/chunk1/b.jsonl.zst"


# (lines appended to file b, expected reason, expected location in the message)
SLIMPAJAMA_CASES = {
    "malformed_json": ([b'{"text": "cut off', sp_doc("after")], "malformed_json", "line 3"),
    "not_an_object": ([b'["text"]'], "malformed_json", "line 3"),
    "missing_text": ([sp_doc("x"), {"meta": {"redpajama_set_name": "RedPajamaC4"}}], "missing_text", "line 4"),
    "text_not_a_string": ([{"text": 42}], "missing_text", "line 3"),
    "invalid_utf8": ([b'{"text": "caf\xe9"}'], "invalid_utf8", "line 3"),
    "lone_surrogate": ([b'{"text": "half \\udc80 a pair"}'], "invalid_utf8", "line 3"),
}


@pytest.mark.parametrize("case", sorted(SLIMPAJAMA_CASES))
def test_bad_slimpajama_line_stops_the_run(case, tiny_tokenizer, tmp_path):
    lines, reason, location = SLIMPAJAMA_CASES[case]
    bad_file = slimpajama_with(tmp_path / "in", lines)
    with pytest.raises(BadInputError) as info:
        tokenize("slimpajama", tmp_path / "in", tmp_path / "out", tiny_tokenizer, workers=2)
    assert (info.value.path, info.value.location, info.value.reason) == (str(tmp_path / "in" / bad_file),
                                                                         location, reason)
    assert f"{bad_file}, {location}: {reason}" in str(info.value) and "--skip-bad" in str(info.value)
    assert_no_partial_output(tmp_path / "out")


def test_truncated_zst_via_cli_names_the_file_and_exits_non_zero(tiny_tokenizer, tmp_path):
    slimpajama_with(tmp_path / "in", [sp_doc(t) for t in documents(30, seed=8)])
    truncate(tmp_path / "in/train/chunk1/b.jsonl.zst")
    result = cli("slimpajama", "--input", tmp_path / "in", "--output", tmp_path / "out",
                 "--tokenizer", tiny_tokenizer, "--workers", 2, "--shard-tokens", SHARD_TOKENS)
    assert result.returncode == 2
    assert f"error: {tmp_path}/in/train/chunk1/b.jsonl.zst: truncated_zst" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert_no_partial_output(tmp_path / "out")


def test_fixing_the_bad_file_then_resuming_matches_a_clean_run(tiny_tokenizer, tmp_path):
    slimpajama_with(tmp_path / "in", [b"{not json"])
    with pytest.raises(BadInputError):
        tokenize("slimpajama", tmp_path / "in", tmp_path / "out", tiny_tokenizer)
    slimpajama_with(tmp_path / "in", [sp_doc("repaired")])  # same names, b changed size
    tokenize("slimpajama", tmp_path / "in", tmp_path / "out", tiny_tokenizer)
    assert decoded(tmp_path / "out", tiny_tokenizer) == GOOD + ["fine one", "fine two", "repaired"]


def test_skip_bad_counts_every_case(tiny_tokenizer, tmp_path):
    root = tmp_path / "in"
    write_jsonl_zst(root / "train/chunk1/a.jsonl.zst", [sp_doc(t) for t in GOOD])
    write_jsonl_zst(root / "train/chunk1/b.jsonl.zst", [
        sp_doc("kept 1"), b'{"text": "cut off', {"meta": {}}, b'{"text": "caf\xe9"}',
        b'{"text": "half \\udc80 a pair"}', sp_doc(""), sp_doc(" \n\t "), sp_doc("code", "RedPajamaGithub"),
        sp_doc("kept 2")])
    tail = documents(40, seed=9)  # sorts last: the truncation cuts off an unknown suffix of it
    truncate(write_jsonl_zst(root / "train/chunk2/c.jsonl.zst", [sp_doc(t) for t in tail]))

    strict = cli("slimpajama", "--input", root, "--output", tmp_path / "strict", "--tokenizer", tiny_tokenizer)
    assert strict.returncode == 2 and "train/chunk1/b.jsonl.zst, line 2: malformed_json" in strict.stderr

    out = tmp_path / "out"
    result = cli("slimpajama", "--input", root, "--output", out, "--tokenizer", tiny_tokenizer, "--skip-bad",
                 "--workers", 2, "--shard-tokens", SHARD_TOKENS)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_documents"] == {"empty": 2, "invalid_utf8": 2, "malformed_json": 1,
                                            "missing_text": 1, "truncated_zst": 1}
    assert summary["excluded_documents"] == {"RedPajamaGithub": 1}
    assert f"{root}/train/chunk1/b.jsonl.zst, line 3: missing_text" in summary["skipped_examples"]

    texts = decoded(out, tiny_tokenizer)
    before = GOOD + ["kept 1", "kept 2"]
    assert texts[:len(before)] == before
    assert texts[len(before):] == tail[:len(texts) - len(before)]  # only complete lines of c survive
    assert summary["documents"] == len(texts)


def test_empty_documents_are_skipped_and_counted_without_skip_bad(tiny_tokenizer, tmp_path):
    slimpajama_with(tmp_path / "in", [sp_doc(""), sp_doc("\n \u3000\t"), sp_doc("last")])
    summary = tokenize("slimpajama", tmp_path / "in", tmp_path / "out", tiny_tokenizer)
    assert summary["skipped_documents"] == {"empty": 2}
    assert decoded(tmp_path / "out", tiny_tokenizer) == GOOD + ["fine one", "fine two", "last"]


def test_only_empty_documents_write_no_shard_and_read_back_as_nothing(tiny_tokenizer, tmp_path):
    write_jsonl_zst(tmp_path / "in/train/chunk1/a.jsonl.zst", [sp_doc(" ")])
    summary = tokenize("slimpajama", tmp_path / "in", tmp_path / "out", tiny_tokenizer)
    assert (summary["documents"], summary["shards"], summary["skipped_documents"]) == (0, [], {"empty": 1})
    assert list_shards(tmp_path / "out") == []


# ---------------------------------------------------------------- StarCoder


def starcoder_with(root, bad_table: pa.Table | bytes) -> str:
    write_parquet(root / "a_lang/good.parquet", pa.table({"content": GOOD}))
    bad = root / "b_lang/bad.parquet"
    if isinstance(bad_table, bytes):
        bad.parent.mkdir(parents=True)
        bad.write_bytes(bad_table)
    else:
        write_parquet(bad, bad_table, row_group_size=2)
    return "b_lang/bad.parquet"


STARCODER_CASES = {
    "missing_column": (pa.table({"text": ["x"]}), "missing_text", None, "no 'content' column (columns: text)"),
    "null_content": (pa.table({"content": ["a", "b", None, "d"]}), "missing_text", "row 3", "'content' is null"),
    "wrong_type": (pa.table({"content": [1, 2]}), "missing_text", None, "has type int64"),
    "invalid_utf8": (pa.table({"content": pa.array([b"ok", b"ok", b"ok", b"\xff\xfe"], pa.binary())}),
                     "invalid_utf8", "row 4", "not UTF-8"),
    "not_parquet": (b"PAR1 this is not really parquet", "corrupt_parquet", None, "cannot open"),
}


@pytest.mark.parametrize("case", sorted(STARCODER_CASES))
def test_bad_starcoder_input_stops_the_run(case, tiny_tokenizer, tmp_path):
    table, reason, location, detail = STARCODER_CASES[case]
    bad_file = starcoder_with(tmp_path / "in", table)
    with pytest.raises(BadInputError) as info:
        tokenize("starcoder", tmp_path / "in", tmp_path / "out", tiny_tokenizer, workers=2)
    assert (info.value.path, info.value.location, info.value.reason) == (str(tmp_path / "in" / bad_file),
                                                                         location, reason)
    assert detail in str(info.value)
    assert_no_partial_output(tmp_path / "out")


def test_starcoder_skip_bad_counts(tiny_tokenizer, tmp_path):
    root = tmp_path / "in"
    starcoder_with(root, pa.table({"content": pa.array([b"a1", None, b"\xff", b"", b"  ", b"a2"], pa.binary())}))
    write_parquet(root / "c_lang/no_content.parquet", pa.table({"code": ["x"]}))
    result = cli("starcoder", "--input", root, "--output", tmp_path / "out", "--tokenizer", tiny_tokenizer,
                 "--skip-bad", "--workers", 2)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["skipped_documents"] == {"empty": 2, "invalid_utf8": 1, "missing_text": 2}
    assert decoded(tmp_path / "out", tiny_tokenizer) == GOOD + ["a1", "a2"]
