"""scripts/chat.py driven through stdin: the second prompt holds the first turn, /reset forgets
it, the oldest turns are dropped to fit the context, Ctrl-C stops an answer and the chat goes
on; the checkpoint's own template is used (ours, an HF Jinja template rendered to the ids
transformers gives, or the default with a notice); bad tokenizers exit with code 2."""
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script, require_module, run_main, tokenizer_for
from finetune.chat import ChatEncoder, ChatTemplate
from finetune.conversation import Conversation, TemplateFormat, find_chat_format
from data_prep.tokenizer import Tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chat.py"


def run_chat(root, stdin: str, *args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=root, input=stdin,
                          capture_output=True, text=True, timeout=300)


def prompts_and_answers(stderr: str) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [json.loads(m) for m in re.findall(r"\[prompt ids: (\[[^\]]*\])\]", stderr)]
    answers = [json.loads(m) for m in re.findall(r"\[answer ids \(\w+\): (\[[^\]]*\])\]", stderr)]
    return prompts, answers


@pytest.mark.slow
def test_two_turns_then_reset(tiny_checkpoints, tiny_tokenizer, request):
    tok = Tokenizer(tiny_tokenizer)
    encoder = ChatEncoder(tok, ChatTemplate())
    first, second, third = "what does the model learn", "and the optimizer", "print the loss"
    result = run_chat(request.config.rootpath, f"{first}\n{second}\n/reset\n{third}\n",
                      "--ckpt", tiny_checkpoints["sft"], "--temperature", 0, "--max-new-tokens", 12, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "chat template: " in result.stderr and "chat_template.json" in result.stderr
    prompts, answers = prompts_and_answers(result.stderr)
    assert len(prompts) == len(answers) == 3
    assert prompts[0] == encoder.conversation_ids([], first) == encoder.prompt_ids(first, 128)
    # The second prompt is the first turn (question and the model's answer, closed by EOS) + the new one.
    assert prompts[1] == encoder.conversation_ids([(first, tok.decode(answers[0]))], second)
    assert prompts[1][:len(prompts[0])] == prompts[0] and tok.eos_id in prompts[1]
    assert prompts[2] == encoder.conversation_ids([], third)  # /reset forgot both turns
    assert "(new conversation)" in result.stderr
    # Only the answers go to stdout when stdin is not a terminal.
    assert result.stdout.count("\n") >= 3 and "what does the model learn" not in result.stdout


@pytest.mark.slow
def test_oldest_turns_dropped_to_fit_the_context(tiny_checkpoints, tiny_tokenizer, request):
    tok = Tokenizer(tiny_tokenizer)
    encoder = ChatEncoder(tok, ChatTemplate())
    messages = [f"message {i}: the model reads tokens and learns to predict the next one" for i in range(4)]
    result = run_chat(request.config.rootpath, "\n".join(messages) + "\n", "--ckpt", tiny_checkpoints["sft"],
                      "--temperature", 0, "--max-new-tokens", 40, "--verbose")
    assert result.returncode == 0, result.stderr
    prompts, answers = prompts_and_answers(result.stderr)
    assert len(prompts) == 4
    assert all(len(p) <= 128 - 40 for p in prompts)
    assert "oldest turn(s) no longer fit the context" in result.stderr
    # The last prompt is the newest turns that fit, ending with the last message; nothing older.
    turns = [(m, tok.decode(a)) for m, a in zip(messages, answers)]
    kept = next(k for k in range(4) if encoder.conversation_ids(turns[k:3], messages[3]) == prompts[3])
    assert kept >= 1
    assert len(encoder.conversation_ids(turns[kept - 1:3], messages[3])) > 128 - 40


def test_base_model_gets_default_template_and_says_so(tiny_checkpoints, request):
    result = run_chat(request.config.rootpath, "hello\n", "--ckpt", tiny_checkpoints["base"],
                      "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr
    assert "has no chat template" in result.stderr and "project's default template" in result.stderr


def test_hf_directory_uses_its_jinja_template(tiny_checkpoints, request):
    """Our exported Jinja template, rendered and tokenized, gives the ids SFT trained on."""
    result = run_chat(request.config.rootpath, "what is a shard\nand a rank\n", "--ckpt", tiny_checkpoints["hf"],
                      "--temperature", 0, "--max-new-tokens", 8, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "tokenizer_config.json (chat_template)" in result.stderr
    prompts, answers = prompts_and_answers(result.stderr)
    tok = Tokenizer(tiny_checkpoints["hf"] / "tokenizer.model")
    encoder = ChatEncoder(tok, ChatTemplate())
    assert prompts[1] == encoder.conversation_ids([("what is a shard", tok.decode(answers[0]))], "and a rank")


ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@pytest.mark.parametrize("template", ["ours", "zephyr"])
@pytest.mark.parametrize("which", ["tiny", "llama2"])
def test_jinja_template_ids_equal_transformers(template, which, tiny_tokenizer, tmp_path):
    """An HF directory's template gives transformers' ids; for our template these are also the
    ids of ChatEncoder.conversation_ids, the layout SFT trained on."""
    transformers = require_module("transformers")
    from model.hf import save_hf_tokenizer

    path = tokenizer_for(which, tiny_tokenizer)
    jinja = ChatTemplate().jinja() if template == "ours" else ZEPHYR
    save_hf_tokenizer(path, tmp_path, chat_template=jinja)
    tok = Tokenizer(path)
    fmt = find_chat_format(tmp_path, tok)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # transformers 5 saves the template as chat_template.jinja beside tokenizer_config.json.
    hf.save_pretrained(tmp_path / "resaved")
    resaved = find_chat_format(tmp_path / "resaved", tok)
    assert resaved.source.endswith("chat_template.jinja")
    turns = [("def f(x): return x", "It adds one.\nDone"), ("naïve café 日本語", "ok ✓")]
    for k in range(len(turns) + 1):
        messages = [{"role": r, "content": c} for u, a in turns[:k] for r, c in (("user", u), ("assistant", a))]
        messages.append({"role": "user", "content": "and the loss?"})
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        # zephyr's template writes no BOS; the model was trained with one (JinjaFormat.chat_ids).
        expected = ([] if template == "ours" else [tok.bos_id]) + list(expected)
        assert fmt.ids(turns[:k], "and the loss?") == resaved.ids(turns[:k], "and the loss?") == list(expected)
        if template == "ours":
            assert ChatEncoder(tok, ChatTemplate()).conversation_ids(turns[:k], "and the loss?") == list(expected)


def test_missing_or_mismatched_tokenizer_is_exit_2(tiny_checkpoints, tiny_tokenizer, tmp_path):
    shutil.copytree(tiny_checkpoints["sft"], tmp_path / "ckpt", ignore=shutil.ignore_patterns("tokenizer.model"))
    result = run_main(load_script("chat").main, "--ckpt", tmp_path / "ckpt")
    assert result.returncode == 2 and "no tokenizer" in result.stderr and "--tokenizer" in result.stderr
    from model import Config, Llama

    Llama(Config.from_name("tiny", vocab_size=300), kernels="torch").save(tmp_path / "small_vocab")
    result = run_main(load_script("chat").main, "--ckpt", tmp_path / "small_vocab",
                      "--tokenizer", tiny_tokenizer)
    assert result.returncode == 2 and "512 pieces but the model's vocab_size is 300" in result.stderr
    assert "Traceback" not in result.stderr


def test_message_too_long_for_the_context_is_refused_not_cut(tiny_tokenizer):
    conv = Conversation(TemplateFormat(Tokenizer(tiny_tokenizer), ChatTemplate(), "test"), max_prompt_len=20)
    with pytest.raises(ValueError, match="room for 20: shorten it"):
        conv.prompt("the model reads tokens and learns " * 5)


class InterruptOnce(io.StringIO):
    """stdout whose Nth write raises KeyboardInterrupt, as Ctrl-C in the middle of an answer does."""

    def __init__(self, at: int):
        super().__init__()
        self.writes, self.at = 0, at

    def write(self, text):
        self.writes += 1
        if self.writes == self.at:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tiny_checkpoints, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("chat_script", SCRIPT)
    chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat)
    out = InterruptOnce(at=3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    monkeypatch.setattr(sys, "stdout", out)
    rc = chat.main(["--ckpt", str(tiny_checkpoints["sft"]), "--temperature", "0", "--max-new-tokens", "30",
                    "--verbose"])
    err = capsys.readouterr().err
    assert rc == 0
    assert err.count("(stopped)") == 1
    prompts, answers = prompts_and_answers(err)
    assert len(prompts) == 2 and len(answers) == 2
    assert len(answers[0]) < 30  # cut short by the interrupt
    tok = Tokenizer(tiny_checkpoints["sft"] / "tokenizer.model")
    encoder = ChatEncoder(tok, ChatTemplate())
    assert prompts[1] == encoder.conversation_ids([("first question", tok.decode(answers[0]))], "second question")


def chat_answers(ckpt, stdin: str, *flags) -> list[list[int]]:
    """The answer ids of scripts/chat.py run in this process on `stdin` (one message a line)."""
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        saved, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            assert load_script("chat").main(["--ckpt", str(ckpt), "--max-new-tokens", "12", "--verbose",
                                             *map(str, flags)]) == 0
        finally:
            sys.stdin = saved
    return prompts_and_answers(err.getvalue())[1]


def test_quit_and_end_of_input_leave_the_chat(tiny_checkpoints):
    """README: `/quit` or Ctrl-D (the end of stdin) leaves; nothing after /quit is answered."""
    ckpt = tiny_checkpoints["sft"]
    assert len(chat_answers(ckpt, "first question\n/quit\nsecond question\n", "--temperature", 0)) == 1
    assert len(chat_answers(ckpt, "first question\nsecond question", "--temperature", 0)) == 2  # EOF, no newline


def test_seed_and_top_p_set_the_sampling(tiny_checkpoints):
    """README: `--temperature`, `--top-p` and `--seed` set the sampling. The same seed gives the same
    answers, another seed other ones; a top-p so small that only the likeliest token is kept is
    greedy decoding, whatever the temperature."""
    ckpt, two = tiny_checkpoints["sft"], "first question\nsecond question\n"
    sampled = [chat_answers(ckpt, two, "--temperature", 1.5, "--seed", seed) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    greedy = chat_answers(ckpt, two, "--temperature", 0)
    assert chat_answers(ckpt, two, "--temperature", 1.5, "--top-p", 1e-6, "--seed", 3) == greedy != sampled[0]
