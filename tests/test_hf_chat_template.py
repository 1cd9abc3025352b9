"""SFT and SPIN with an HF checkpoint's own chat template (finetune/hf_chat.py).

A zephyr-style template (the layout of TinyLlama-1.1B-Chat and zephyr-7b) is written here into
an HF directory: our prompt ids and training rows equal transformers' apply_chat_template
ids and the prompt is a token prefix of the row; templates that cannot be split at a token
boundary, or do not close the answer with EOS, are refused with the file and the fix; SFT and
SPIN run from the HF directory, train and generate with that template, and carry it to every
checkpoint they write, to the chat and to the HF export."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_module, tokenizer_for
from test_spin_e2e import chat_file, run_cli  # noqa: F401  (fixture)

from finetune.chat import ChatEncoder, ChatTemplate
from finetune.conversation import HFChatTemplate, find_chat_format, load_chat_template
from finetune.hf_chat import JinjaChatEncoder, chat_encoder
from data_prep.tokenizer import Tokenizer
from model import Config, Llama
from model.hf import save_hf, save_hf_tokenizer

REPO = Path(__file__).resolve().parents[1]

# The chat template of zephyr-7b-sft-full and TinyLlama-1.1B-Chat, as their tokenizer_config.json has it.
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# Vicuna-style: the generation prompt ends with a space, which the answer's first word absorbs.
TRAILING_SPACE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{{ 'USER: ' + message['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
NO_EOS = ZEPHYR.replace("'<|assistant|>\n'  + message['content'] + eos_token", "'<|assistant|>\n'  + message['content']")

EXCHANGES = [("the model reads tokens", "It learns to predict the next one.\nDone"),
             (" a leading space", "a trailing space "), ("naïve café 日本語", "ok ✓"), ("add 3 4", "3 plus 4 is 7")]


def hf_dir(path: Path, tokenizer: Path, template: str, model: bool = False) -> Path:
    """An HF directory: the tokenizer files with `template` (and a random tiny model if asked)."""
    path.mkdir(parents=True, exist_ok=True)
    if model:
        torch.manual_seed(0)
        save_hf(Llama(Config.from_name("tiny"), kernels="torch"), path)
    save_hf_tokenizer(tokenizer, path, chat_template=template)
    return path


def transformers_ids(hf, messages, add_generation_prompt: bool) -> list[int]:
    """apply_chat_template's ids, with the BOS that training pipelines (alignment-handbook, TRL)
    add when the template writes none, as zephyr's does not."""
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return ids if ids[:1] == [hf.bos_token_id] else [hf.bos_token_id] + ids


@pytest.mark.parametrize("which", ["tiny", "llama2"])
def test_prompt_and_row_ids_equal_transformers(which, tiny_tokenizer, tmp_path):
    transformers = require_module("transformers")
    path = tokenizer_for(which, tiny_tokenizer)
    directory = hf_dir(tmp_path / "hf", path, ZEPHYR)
    tok = Tokenizer(path)
    template = load_chat_template(directory)
    assert isinstance(template, HFChatTemplate) and template.text == ZEPHYR
    encoder = chat_encoder(tok, template)
    assert isinstance(encoder, JinjaChatEncoder)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for prompt, answer in EXCHANGES:
        user, assistant = {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}
        expected_prompt = transformers_ids(hf, [user], True)
        expected_row = transformers_ids(hf, [user, assistant], False)
        prompt_ids, answer_ids = encoder.split(prompt, answer)
        assert prompt_ids == expected_prompt
        assert expected_row[:len(prompt_ids)] == prompt_ids  # the prompt is a token prefix of the row
        # The answer is the rest of the row up to its EOS; zephyr's "\n" after it is not trained.
        assert prompt_ids + answer_ids == expected_row[:len(prompt_ids) + len(answer_ids)]
        assert answer_ids[-1] == tok.eos_id and tok.decode(expected_row[len(prompt_ids) + len(answer_ids):]) == "\n"
        # What SFT trains on and what SPIN generates from, uncut.
        assert encoder.prompt_ids(prompt, 128) == prompt_ids
        assert encoder.encode_example(prompt, answer, 128) == (prompt_ids, answer_ids)
        assert encoder.answer_ids(prompt, answer) == answer_ids
    assert encoder.stats.prompts_truncated == encoder.stats.responses_truncated == 0


def test_long_prompts_and_answers_are_cut_inside_the_template(tiny_tokenizer, tmp_path):
    """Truncation keeps the template's head and tail and the end of the prompt, as with our template."""
    encoder = chat_encoder(Tokenizer(tiny_tokenizer), load_chat_template(hf_dir(tmp_path, tiny_tokenizer, ZEPHYR)))
    prompt = " ".join(f"word{i}" for i in range(40)) + " and the question"
    head, body, tail = encoder.prompt_parts(prompt)
    full, _ = encoder.split(prompt, "x")
    assert head + body + tail == full and len(body) > 20
    cut = encoder.prompt_ids(prompt, len(head) + len(tail) + 5)
    assert cut == head + body[-5:] + tail and encoder.stats.prompts_truncated == 1
    answer = "It learns to predict the next one. " * 8
    # The prompt gives way first, down to one token of its own; then the answer's end is cut
    # (losing its EOS, as with our template).
    prompt_ids, answer_ids = encoder.encode_example(prompt, answer, len(head) + len(tail) + 11)
    assert prompt_ids == head + body[-1:] + tail
    assert answer_ids == encoder.answer_ids(prompt, answer)[:10] and encoder.tokenizer.eos_id not in answer_ids
    assert encoder.stats.as_dict() == {"prompts_truncated": 2, "responses_truncated": 1}


def test_our_template_through_hf_gives_our_ids(tiny_checkpoints, tiny_tokenizer):
    """An HF export of our own template (conftest's "hf" checkpoint) trains on the rows ChatEncoder makes."""
    tok = Tokenizer(tiny_tokenizer)
    jinja, ours = chat_encoder(tok, load_chat_template(tiny_checkpoints["hf"])), ChatEncoder(tok, ChatTemplate())
    assert isinstance(jinja, JinjaChatEncoder)
    for prompt, answer in EXCHANGES:
        assert jinja.encode_example(prompt, answer, 128) == ours.encode_example(prompt, answer, 128)


@pytest.mark.parametrize("template,message", [
    (TRAILING_SPACE, "cannot be split at a token boundary"),
    (NO_EOS, "does not close the assistant's answer with eos_token"),
])
def test_unsplittable_template_is_refused_with_file_and_fix(template, message, tiny_tokenizer, tmp_path):
    directory = hf_dir(tmp_path / "hf", tiny_tokenizer, template)
    with pytest.raises(ValueError) as err:
        chat_encoder(Tokenizer(tiny_tokenizer), load_chat_template(directory))
    text = str(err.value)
    assert text.startswith(f"{directory / 'tokenizer_config.json'} (chat_template): ") and message in text
    if template == TRAILING_SPACE:
        # Where the ids part: the prompt ends with the space alone, the conversation with space + word.
        assert "differ from token" in text and "'▁'" in text
        assert "prompt:" in text and "conversation:" in text and "Fix: " in text and "not a space" in text
    else:
        assert "add `+ eos_token`" in text


def test_sft_refuses_an_unsplittable_template_before_training(tiny_tokenizer, chat_file, tmp_path):  # noqa: F811
    directory = hf_dir(tmp_path / "hf", tiny_tokenizer, TRAILING_SPACE, model=True)
    r = run_cli("sft.py", "--ckpt", directory, "--data", chat_file, "--out", tmp_path / "sft", "--max-steps", 1)
    assert r.returncode == 2
    assert "tokenizer_config.json (chat_template): the chat template cannot be split" in r.stderr
    assert not (tmp_path / "sft" / "final").exists()


def assert_carries_zephyr(directory: Path) -> None:
    assert not (directory / "chat_template.json").exists()  # not ours
    assert (directory / "chat_template.jinja").read_text() == ZEPHYR
    tokens = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokens["eos_token"] == "</s>" and tokens["bos_token"] == "<s>"


@pytest.mark.slow
def test_sft_and_spin_train_and_generate_with_the_hf_template(tiny_tokenizer, chat_file, tmp_path):  # noqa: F811
    transformers = require_module("transformers")
    start = hf_dir(tmp_path / "zephyr", tiny_tokenizer, ZEPHYR, model=True)
    tok = Tokenizer(tiny_tokenizer)
    encoder = chat_encoder(tok, load_chat_template(start))
    sft = tmp_path / "sft"
    r = run_cli("sft.py", "--ckpt", start, "--data", chat_file, "--out", sft, "--max-steps", 2,
                "--global-batch-size", 8, "--micro-batch-size", 4, "--lr", 1e-3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"chat template: the HF checkpoint's own, from {start / 'tokenizer_config.json'}" in r.stdout + r.stderr
    assert "the HF checkpoint's own" in (sft / "config.yaml").read_text()
    assert_carries_zephyr(sft / "final")

    spin = tmp_path / "spin"
    args = ["--ckpt", sft / "final", "--data", chat_file, "--out", spin, "--iterations", 2, "--num-prompts", 8,
            "--max-new-tokens", 8, "--max-prompt-len", 40, "--max-len", 64, "--global-batch-size", 8,
            "--micro-batch-size", 4, "--epochs", 1, "--lr", 1e-4, "--temperature", 0, "--no-progress"]
    r = run_cli("spin.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"chat template: the HF checkpoint's own, from {sft / 'final' / 'chat_template.jinja'}" in r.stdout + r.stderr
    for t in (1, 2):
        assert_carries_zephyr(spin / f"iter{t}")
    run_args = json.loads((spin / "run_args.json").read_text())
    assert run_args["chat_template"] == load_chat_template(sft / "final").fingerprint()

    # SPIN generated from, and trained after, the prompt ids SFT trained after: the template's own.
    hf = transformers.AutoTokenizer.from_pretrained(start)
    rows = {json.loads(line)["prompt_id"]: json.loads(line) for line in (chat_file.read_text().splitlines())}
    for t in (0, 1):
        pairs = [json.loads(line) for line in (spin / "work" / f"iter{t}" / "pairs.jsonl").read_text().splitlines()]
        assert pairs
        for pair in pairs:
            user, answer = (m["content"] for m in rows[pair["prompt_id"]]["messages"])
            assert pair["prompt_ids"] == encoder.encode_example(user, answer, 64)[0]
            assert pair["prompt_ids"] == transformers_ids(hf, [{"role": "user", "content": user}], True)
            assert pair["real_ids"] == encoder.answer_ids(user, answer) and pair["real_ids"][-1] == tok.eos_id

    # The chat and the HF export read the same template back from SPIN's output.
    fmt = find_chat_format(spin / "iter2", tok)
    assert fmt.source == str(spin / "iter2" / "chat_template.jinja")
    assert fmt.ids([], "add 3 4") == encoder.prompt_ids("add 3 4", 64)
    export = tmp_path / "export"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_hf.py"), "export", "--ckpt", spin / "iter2",
                        "--out", export], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == ZEPHYR
    exported = transformers.AutoTokenizer.from_pretrained(export)
    assert transformers_ids(exported, [{"role": "user", "content": "add 3 4"}], True) == fmt.ids([], "add 3 4")

    # A resumed run whose start checkpoint now has another template is refused, like other stage flags.
    (sft / "final" / "chat_template.jinja").write_text(ZEPHYR.replace("<|user|>", "<|human|>"))
    r = run_cli("spin.py", *args)
    assert r.returncode == 2 and "the chat template was hf sha256:" in r.stderr, r.stderr[-3000:]
