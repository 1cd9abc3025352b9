"""The one tokenizer interface (data_prep/tokenizer.py) with an HF tokenizer.json: encode,
decode and the special tokens equal transformers' AutoTokenizer on the byte-level BPE that
conftest builds (ChatML / Llama-3 / zephyr special-token files); where the files are looked
for; the fingerprint; and the refusals (no EOS, a special token the tokenizer lacks, a bad
generation_config, a tokenizer larger than the model's embedding, through the CLI too)."""
import hashlib
import json
import pickle
import shutil

import pytest
from conftest import MULTI_BYTE, load_script, require_module, run_main

from data_prep.tokenizer import Tokenizer, load_tokenizer, tokenizer_files

TEXTS = ["hello world", " a leading space", "two\nlines\n\n and  double  spaces ", MULTI_BYTE,
         "def f(x):\n    return x + 1", "text with <|im_end|> and </s> written in it"]
FLAVOURS = {  # flavour -> (bos, eos, pad, stop tokens) as its files name them
    "chatml": ("<|im_start|>", "<|im_end|>", "<|im_end|>", ["<|im_end|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", ["<|eot_id|>", "<|end_of_text|>"]),
    "zephyr": ("<s>", "</s>", "</s>", ["</s>"]),
}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_ids_and_text_equal_transformers(flavour, hf_tokenizers):
    transformers = require_module("transformers")
    directory = hf_tokenizers[flavour]
    tok, hf = Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert tok.kind == "tokenizer.json" and tok.path == directory / "tokenizer.json"
    assert tok.vocab_size == len(hf) == 600
    bos, eos, pad, stops = FLAVOURS[flavour]
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (hf.convert_tokens_to_ids(bos),
                                                                             hf.convert_tokens_to_ids(eos))
    assert tok.pad_id == hf.convert_tokens_to_ids(pad)
    assert tok.stop_ids == tuple(hf.convert_tokens_to_ids(stops))
    # ChatML adds no BOS to a text (SmolLM2); Llama-3 and zephyr do, through tokenizer.json's post-processor.
    assert tok.prefix_ids == ([] if flavour == "chatml" else [tok.bos_id])
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert tok.prefix_ids + tok.encode(text) == ids, text
        assert tok.encode_batch([text, text]) == [tok.encode(text)] * 2
        # Special tokens are left out of the text, as with skip_special_tokens (the old code dropped EOS).
        with_specials = ids + [tok.eos_id, tok.pad_id]
        decoded = tok.decode(with_specials)
        assert decoded == hf.decode(with_specials, skip_special_tokens=True)
        assert decoded == text.replace("<|im_end|>", "").replace("</s>", "")
    # Pickled (data_prep sends it to worker processes) it encodes the same.
    assert pickle.loads(pickle.dumps(tok)).encode(MULTI_BYTE) == tok.encode(MULTI_BYTE)


def test_files_are_found_beside_a_canonical_file_or_in_a_directory(hf_tokenizers, tiny_tokenizer, tmp_path):
    directory = hf_tokenizers["llama3"]
    from_dir, from_file = Tokenizer(directory), Tokenizer(directory / "tokenizer.json")
    assert from_dir.stop_ids == from_file.stop_ids == (from_dir.eos_id, from_dir.token_to_id("<|end_of_text|>"))
    assert set(tokenizer_files(directory)) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    # A directory with both files: tokenizer.json, as transformers prefers it.
    shutil.copytree(directory, tmp_path / "both")
    shutil.copyfile(tiny_tokenizer, tmp_path / "both" / "tokenizer.model")
    assert Tokenizer(tmp_path / "both").kind == "tokenizer.json"
    # A file with another name stands alone: a tokenizer.json says nothing about EOS by itself.
    shutil.copyfile(directory / "tokenizer.json", tmp_path / "mine.json")
    with pytest.raises(ValueError, match=r"mine.json defines no EOS piece.*tokenizer_config.json naming eos_token"):
        Tokenizer(tmp_path / "mine.json")
    assert Tokenizer(tmp_path / "mine.json", eos_token="<|end_of_text|>").eos_id == 7


def test_fingerprint(hf_tokenizers, tiny_tokenizer, tmp_path):
    """A sentencepiece model's is its file's sha256 (data_prep runs made before keep resuming);
    a tokenizer.json's changes with the file and with the special tokens, not with the template."""
    assert Tokenizer(tiny_tokenizer).sha256 == hashlib.sha256(tiny_tokenizer.read_bytes()).hexdigest()
    base = Tokenizer(hf_tokenizers["chatml"]).sha256

    def variant(name, edit) -> str:
        directory = shutil.copytree(hf_tokenizers["chatml"], tmp_path / name)
        edit(directory)
        return Tokenizer(directory).sha256

    def config(**changes):
        def edit(directory):
            path = directory / "tokenizer_config.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | changes))
        return edit

    def grow(directory):
        data = json.loads((directory / "tokenizer.json").read_text())
        data["added_tokens"].append({**data["added_tokens"][-1], "id": 600, "content": "<|new|>"})
        (directory / "tokenizer.json").write_text(json.dumps(data))

    assert variant("template", lambda d: (d / "chat_template.jinja").write_text("{{ messages }}")) == base
    assert variant("eos", config(eos_token="<|endoftext|>")) != base
    assert variant("bos", config(add_bos_token=True)) != base
    assert variant("file", grow) != base


def test_bad_special_token_files_are_refused_naming_the_file(hf_tokenizers, tmp_path):
    directory = shutil.copytree(hf_tokenizers["llama3"], tmp_path / "t")
    config = directory / "tokenizer_config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps(good | {"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match=rf"{config}: eos_token '<\|missing\|>' is not a token of"):
        Tokenizer(directory)
    config.write_text(json.dumps(good))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9999]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id \[7, 9999\] must be"):
        Tokenizer(directory)
    (directory / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config.json: not valid JSON"):
        Tokenizer(directory)


def test_tokenizer_larger_than_the_embedding_is_refused(hf_tokenizers, tmp_path):
    with pytest.raises(ValueError, match="has 600 tokens but the model's vocab_size is 512"):
        load_tokenizer(override=hf_tokenizers["chatml"], model_vocab_size=512)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json or tokenizer.model"):
        load_tokenizer(override=tmp_path)
    from model import Config, Llama

    Llama(Config.from_name("tiny"), kernels="torch").save(tmp_path / "ckpt")  # 512 rows
    for script, extra in (("generate.py", ["--prompt", "x"]), ("chat.py", [])):
        r = run_main(load_script(script[:-3]).main, "--ckpt", tmp_path / "ckpt", "--tokenizer",
                     hf_tokenizers["chatml"] / "tokenizer.json", *extra)
        assert r.returncode == 2 and "has 600 tokens but the model's vocab_size is 512" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_checkpoints_carry_the_tokenizer_files(hf_tokenizers, tiny_tokenizer, tmp_path):
    """Pretraining's and finetuning's checkpoints copy the tokenizer's files under their names."""
    from model import Config, Llama
    from pretrain.checkpoint import write_consolidated

    model = Llama(Config.from_name("tiny", vocab_size=600), kernels="torch")
    for name, source in (("json", hf_tokenizers["llama3"]), ("spm", tiny_tokenizer)):
        out = write_consolidated(model, tmp_path / name, tokenizer=source)
        copied = {p.name for p in out.iterdir()} - {"config.json", "model.safetensors"}
        expected = set(tokenizer_files(source))
        assert copied == expected == ({"tokenizer.model"} if name == "spm" else
                                      {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
        tok, original = load_tokenizer(out, model_vocab_size=600), Tokenizer(source)
        assert (tok.sha256, tok.stop_ids, tok.prefix_ids) == (original.sha256, original.stop_ids, original.prefix_ids)
