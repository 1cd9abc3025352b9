"""data_prep with an HF tokenizer.json (conftest's byte-level BPE, ChatML files: eos_token
<|im_end|>): `--tokenizer DIR` or `DIR/tokenizer.json` give the same shards, every document
is its text's ids then the separator (the tokenizer's EOS, or --eos-token's), which the shard
headers record and pretraining's --document-mask reads; a vocabulary above 65,536 ids (many
added tokens) gets uint32 shards; a tokenizer.json that names no EOS is refused."""
import shutil

import numpy as np
import pytest
from test_data_prep import cli, cli_refused, shard_bytes, slimpajama, starcoder, tokenize  # noqa: F401  (fixtures)

from data_prep import iter_documents, list_shards, read_header, read_shard
from data_prep.errors import DataPrepError
from data_prep.tokenizer import Tokenizer


def decoded(out, tok: Tokenizer) -> list[str]:
    return [tok.decode(doc.tolist()) for doc in iter_documents(out)]


def stream(out) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in list_shards(out)])


def test_tokenizer_json_shards_end_documents_with_the_chosen_eos(slimpajama, hf_tokenizers, tmp_path):  # noqa: F811
    from pretrain.data import MixtureSampler, SourceSpec

    root, kept = slimpajama
    directory = hf_tokenizers["chatml"]
    tok = Tokenizer(directory)
    by_file = cli("slimpajama", "--input", root, "--split", "train", "--output", tmp_path / "file",
                  "--tokenizer", directory / "tokenizer.json", "--workers", 2, "--shard-tokens", 150)
    assert by_file.returncode == 0, by_file.stderr
    by_dir = tokenize("slimpajama", root, tmp_path / "dir", directory, workers=1)
    assert shard_bytes(tmp_path / "file") == shard_bytes(tmp_path / "dir")
    assert decoded(tmp_path / "dir", tok) == kept
    # Each document: its ids, then EOS (<|im_end|>, this tokenizer's eos_token), nothing else.
    tokens = stream(tmp_path / "dir")
    expected = np.concatenate([tok.encode(text) + [tok.eos_id] for text in kept])
    assert tokens.tolist() == expected.tolist() and tok.eos_id == 2
    assert {read_header(p).eos_id for p in list_shards(tmp_path / "dir")} == {2}
    assert by_dir["tokenizer"]["kind"] == "tokenizer.json" and by_dir["settings"]["tokenizer_sha256"] == tok.sha256
    assert by_dir["dtype"] == "uint16"
    # --eos-token: SmolLM2's pretraining separator <|endoftext|> (id 0) instead of its end-of-turn.
    other = tokenize("slimpajama", root, tmp_path / "endoftext", directory, eos_token="<|endoftext|>")
    assert stream(tmp_path / "endoftext").tolist() == \
        np.concatenate([tok.encode(text) + [0] for text in kept]).tolist()
    assert other["tokenizer"]["eos_token"] == "<|endoftext|>" and other["settings"]["eos_id"] == 0
    assert other["settings"]["tokenizer_sha256"] != by_dir["settings"]["tokenizer_sha256"]
    # What pretraining's --document-mask takes as the document separator: the headers' EOS.
    for out, eos in (("dir", 2), ("endoftext", 0)):
        assert MixtureSampler([SourceSpec(tmp_path / out, 1.0)], 16, 0, tok.vocab_size).eos_id() == eos
    with pytest.raises(DataPrepError, match=r"--eos-token: eos_token '<\|nope\|>' is not a token of"):
        tokenize("slimpajama", root, tmp_path / "nope", directory, eos_token="<|nope|>")


def test_vocabulary_beyond_uint16_with_added_tokens(starcoder, hf_tokenizers, tmp_path):  # noqa: F811
    import tokenizers
    big = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "big")
    backend = tokenizers.Tokenizer.from_file(str(big / "tokenizer.json"))
    backend.add_tokens([f"<extra_{i}>" for i in range(70_000)])
    backend.save(str(big / "tokenizer.json"))
    root, kept = starcoder
    with pytest.raises(DataPrepError, match=r"70600 pieces.*do not fit --dtype uint16"):
        tokenize("starcoder", root, tmp_path / "o16", big, dtype="uint16")
    summary = tokenize("starcoder", root, tmp_path / "o32", big)  # auto -> uint32
    assert summary["dtype"] == "uint32" and read_header(list_shards(tmp_path / "o32")[0]).dtype == np.dtype("<u4")
    assert decoded(tmp_path / "o32", Tokenizer(big)) == kept


def test_tokenizer_json_without_eos_is_refused(starcoder, hf_tokenizers, tmp_path):  # noqa: F811
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(hf_tokenizers["chatml"] / "tokenizer.json", bare / "tokenizer.json")
    root, kept = starcoder
    r = cli_refused("starcoder", "--input", root, "--output", tmp_path / "o", "--tokenizer", bare)
    assert r.returncode == 2 and "defines no EOS piece" in r.stderr and "--eos-token" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    summary = tokenize("starcoder", root, tmp_path / "ok", bare, eos_token="<|endoftext|>")
    assert summary["settings"]["eos_id"] == 0 and decoded(tmp_path / "ok", Tokenizer(bare, "<|endoftext|>")) == kept
