"""Chat templates with an HF tokenizer.json (conftest's byte-level BPE): SmolLM2's exact ChatML
template (it writes a default system message), Llama-3's headers (the template writes
bos_token itself) and zephyr's, with and without a system message, give transformers'
apply_chat_template ids for generation prompts, training rows and multi-turn chats; each
answer ends at the template's end-of-turn token (<|im_end|>, <|eot_id|>, </s>), which is a
stop id even when it is not the tokenizer's EOS; a template with no generation prompt is
refused (exit 2, naming the file); our own template exported for a BPE tokenizer gives our
ids; export carries the tokenizer files in kind; chat.py --system; SFT trains the answer up
to <|im_end|> and carries the tokenizer files."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MULTI_BYTE, REPO, SMOLLM2_TEMPLATE, require_module

from data_prep.tokenizer import Tokenizer
from finetune.chat import IGNORE_INDEX, ChatEncoder, ChatTemplate, sft_row
from finetune.conversation import find_chat_format, load_chat_template
from finetune.hf_chat import chat_encoder

EXCHANGES = [("What is two plus two?", "Four."), (" a leading space", "a trailing space \n"),
             (MULTI_BYTE, "ok ✓ 😀"), ("two\nlines", "line one\nline two")]
SYSTEMS = [None, "You are terse. Answer in one word."]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "</s>", "chatml_base": "<|im_end|>"}
AFTER_ANSWER = {"chatml": "\n", "llama3": "", "zephyr": "\n", "chatml_base": "\n"}


@pytest.fixture(scope="module")
def templates(hf_tokenizers, tmp_path_factory) -> dict[str, Path]:
    """conftest's three directories, and "chatml_base": ChatML with a tokenizer whose EOS is
    <|endoftext|> (a base model's, as SmolLM2's and Qwen's base tokenizers): the end-of-turn
    token <|im_end|> is not its EOS."""
    base = shutil.copytree(hf_tokenizers["chatml"], tmp_path_factory.mktemp("templates") / "chatml_base")
    config = base / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"eos_token": "<|endoftext|>",
                                                                     "bos_token": None, "pad_token": None}))
    return {**hf_tokenizers, "chatml_base": base}


def messages(system, turns, prompt=None):
    out = [] if system is None else [{"role": "system", "content": system}]
    for user, answer in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out + ([] if prompt is None else [{"role": "user", "content": prompt}])


def transformers_ids(hf, tok: Tokenizer, msgs, add_generation_prompt: bool) -> list[int]:
    """apply_chat_template's ids, with the tokenizer's BOS first where the template writes none
    (zephyr), as training pipelines add it (finetune/conversation.py `JinjaFormat.chat_ids`)."""
    ids = hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    prefix = tok.prefix_ids
    return ids if ids[:len(prefix)] == prefix else prefix + ids


@pytest.mark.parametrize("system", SYSTEMS, ids=["no-system", "system"])
@pytest.mark.parametrize("flavour", sorted(END_OF_TURN))
def test_prompts_rows_and_chats_equal_transformers(flavour, system, templates):
    transformers = require_module("transformers")
    directory = templates[flavour]
    tok, hf = Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    encoder = chat_encoder(tok, load_chat_template(directory), system=system)
    eot = tok.token_to_id(END_OF_TURN[flavour])
    assert encoder.end_of_turn == eot and encoder.stop_ids[0] == eot and set(tok.stop_ids) <= set(encoder.stop_ids)
    for prompt, answer in EXCHANGES:
        expected_prompt = transformers_ids(hf, tok, messages(system, [], prompt), True)
        expected_row = transformers_ids(hf, tok, messages(system, [(prompt, answer)]), False)
        prompt_ids, answer_ids = encoder.split(prompt, answer)
        assert prompt_ids == expected_prompt == encoder.prompt_ids(prompt, 512)
        # The answer is the rest of the row up to and including its end-of-turn token: the last trained token.
        assert prompt_ids + answer_ids == expected_row[:len(prompt_ids) + len(answer_ids)]
        assert answer_ids[-1] == eot and tok.decode(expected_row[len(prompt_ids) + len(answer_ids):]) == \
            AFTER_ANSWER[flavour]
        ids, labels = sft_row(*encoder.encode_example(prompt, answer, 512))
        assert [label for label in labels if label != IGNORE_INDEX] == answer_ids
        if flavour == "chatml" and system is None:  # SmolLM2's template writes its own system message
            assert "You are a helpful AI assistant named SmolLM" in tok.decode(prompt_ids)
    fmt = find_chat_format(directory, tok)
    assert fmt.stop_ids == encoder.stop_ids
    turns = EXCHANGES[:2]
    for k in range(len(turns) + 1):
        expected = transformers_ids(hf, tok, messages(system, turns[:k], "and then?"), True)
        assert fmt.ids(turns[:k], "and then?", system) == encoder.conversation_ids(turns[:k], "and then?") == expected


def test_template_without_generation_prompt_is_refused(templates, tmp_path):
    directory = shutil.copytree(templates["chatml"], tmp_path / "t")
    no_prompt = SMOLLM2_TEMPLATE[:SMOLLM2_TEMPLATE.index("{% if add_generation_prompt %}")]
    (directory / "chat_template.jinja").write_text(no_prompt)
    with pytest.raises(ValueError, match=r"chat_template.jinja: the chat template has no generation prompt"):
        find_chat_format(directory, Tokenizer(directory))
    ckpt = hf_model_dir(tmp_path / "ckpt", directory)
    r = run_script("chat.py", "--ckpt", ckpt, stdin="hi\n")
    assert r.returncode == 2 and f"{ckpt / 'chat_template.jinja'}: the chat template has no generation prompt" \
        in r.stderr and "Traceback" not in r.stderr


def test_template_without_end_of_turn_is_refused_for_training(templates, tmp_path):
    directory = shutil.copytree(templates["chatml"], tmp_path / "t")
    (directory / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE.replace("'<|im_end|>' + '\n'", "'\n'"))
    with pytest.raises(ValueError, match="does not close the assistant's answer with eos_token or another special"):
        chat_encoder(Tokenizer(directory), load_chat_template(directory))


def test_our_template_exported_for_a_bpe_tokenizer_gives_our_ids(templates, tmp_path):
    """Byte-level BPE adds no leading space, so the exported Jinja writes none (finetune/chat.py)."""
    transformers = require_module("transformers")
    from model.hf import save_hf_tokenizer

    tok = Tokenizer(templates["chatml"])
    assert not tok.adds_prefix_space
    save_hf_tokenizer(tok, tmp_path, chat_template=ChatTemplate().jinja(tok.adds_prefix_space))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = ChatEncoder(tok, ChatTemplate())
    for prompt, answer in EXCHANGES[:1] + EXCHANGES[2:3]:
        prompt_ids, answer_ids = ours.encode_example(prompt, answer, 512)
        assert transformers_ids(hf, tok, messages(None, [(prompt, answer)]), False) == prompt_ids + answer_ids


def hf_model_dir(path: Path, tokenizer_dir: Path, vocab_size: int = 600) -> Path:
    """A random tiny HF Llama directory with the tokenizer files of `tokenizer_dir`."""
    import torch

    from model import Config, Llama
    from model.hf import save_hf

    torch.manual_seed(0)
    save_hf(Llama(Config.from_name("tiny", vocab_size=vocab_size), kernels="torch"), path)
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, path / f.name)
    return path


def run_script(name: str, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    folder = "finetune" if name in ("sft.py", "spin.py") else "scripts"
    return subprocess.run([sys.executable, str(REPO / folder / name), *map(str, args)], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_carries_tokenizer_json_files(templates, tmp_path):
    """Import an HF directory with a tokenizer.json, export it: tokenizer.json unchanged, its
    tokenizer_config.json (added tokens too) with the template, generation_config's eos list; and
    transformers reads the export with our ids."""
    transformers = require_module("transformers")
    source = shutil.copytree(templates["llama3"], tmp_path / "tok")
    config = source / "tokenizer_config.json"
    added = {"10": {"content": "<|eot_id|>", "special": True, "lstrip": False, "rstrip": False,
                    "normalized": False, "single_word": False}}
    config.write_text(json.dumps(json.loads(config.read_text()) | {"added_tokens_decoder": added}))
    hf_dir = hf_model_dir(tmp_path / "hf", source)
    r = run_script("convert_hf.py", "import", "--hf", hf_dir, "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (source / name).read_bytes()
    r = run_script("convert_hf.py", "export", "--ckpt", tmp_path / "ours", "--out", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    export = tmp_path / "export"
    assert (export / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert not (export / "tokenizer.model").exists()
    exported_config = json.loads((export / "tokenizer_config.json").read_text())
    assert exported_config["added_tokens_decoder"] == added and exported_config["eos_token"] == "<|eot_id|>"
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [10, 7]
    tok = Tokenizer(tmp_path / "ours")
    assert Tokenizer(export).sha256 == tok.sha256 and Tokenizer(export).stop_ids == (10, 7)
    hf = transformers.AutoTokenizer.from_pretrained(export)
    encoder = chat_encoder(tok, load_chat_template(tmp_path / "ours"))
    for prompt, answer in EXCHANGES:
        assert hf(prompt)["input_ids"] == tok.prefix_ids + tok.encode(prompt)
        assert transformers_ids(hf, tok, messages(None, [], prompt), True) == encoder.prompt_ids(prompt, 512)


@pytest.mark.slow
def test_chat_system_message(templates, tmp_path):
    transformers = require_module("transformers")
    ckpt = hf_model_dir(tmp_path / "ckpt", templates["chatml"])
    hf, tok = transformers.AutoTokenizer.from_pretrained(ckpt), Tokenizer(ckpt)
    system = SYSTEMS[1]
    r = run_script("chat.py", "--ckpt", ckpt, "--temperature", 0, "--max-new-tokens", 4, "--verbose",
                   "--system", system, stdin="hello there\n")
    assert r.returncode == 0, r.stderr
    assert "answers end at '<|im_end|>' (2)" in r.stderr
    prompt = json.loads(r.stderr.split("[prompt ids: ")[1].split("]")[0] + "]")
    assert prompt == transformers_ids(hf, tok, messages(system, [], "hello there"), True)
    # Our template has no system turn: refused at start.
    ours = tmp_path / "ours"
    shutil.copytree(ckpt, ours, ignore=shutil.ignore_patterns("chat_template.jinja"))
    ChatTemplate().save(ours, prefix_space=False)
    r = run_script("chat.py", "--ckpt", ours, "--system", "be brief", stdin="hi\n")
    assert r.returncode == 2 and "has no system turn" in r.stderr


@pytest.mark.slow
def test_sft_trains_up_to_the_end_of_turn_token_and_keeps_the_tokenizer(templates, tmp_path):
    """ChatML with EOS <|endoftext|>: the answer ends with <|im_end|>, the end-of-turn token."""
    ckpt = hf_model_dir(tmp_path / "base", templates["chatml_base"])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt_id": str(i), "messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
        for i in range(8)))
    r = run_script("sft.py", "--ckpt", ckpt, "--data", data, "--out", tmp_path / "sft", "--max-steps", 1,
                   "--global-batch-size", 4, "--micro-batch-size", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "sft" / "final"
    assert (final / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert not (final / "tokenizer.model").exists()
    tok = Tokenizer(final)
    assert tok.sha256 == Tokenizer(ckpt).sha256 and tok.eos_id == 0
    encoder = chat_encoder(tok, load_chat_template(final))
    assert encoder.stop_ids == (2, 0)  # <|im_end|> ends answers, <|endoftext|> is the tokenizer's EOS
    assert encoder.answer_ids("What is 1 plus 1?", "2.")[-1] == 2
