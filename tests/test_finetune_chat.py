"""Chat data reading, the template and tokenisation boundaries (finetune/chat.py, tokenizer.py)."""
import json

import pytest
from conftest import require_module, tokenizer_for

from finetune.chat import ChatEncoder, ChatTemplate, IGNORE_INDEX, read_chat, sft_row
from data_prep.tokenizer import load_tokenizer


def write_chat(path, n=4):
    rows = [{"prompt": f"What is {i} plus {i}?", "prompt_id": f"p{i}",
             "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."},
                          {"role": "user", "content": "thanks"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_read_chat_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = write_chat(tmp_path / "c.jsonl")
    ex = read_chat(tmp_path / "c.jsonl")
    assert [e.prompt_id for e in ex] == ["p0", "p1", "p2", "p3"]
    assert ex[2].prompt == "What is 2 plus 2?" and ex[2].response == "The answer is 4."
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert [(e.prompt, e.response) for e in read_chat(tmp_path / "c.parquet", limit=2)] == \
        [(e.prompt, e.response) for e in ex[:2]]


def test_read_chat_errors_name_line_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                 + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*assistant"):
        read_chat(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_chat(p)


def test_generation_prompt_is_prefix_of_training_sequence(tiny_tokenizer):
    tok = load_tokenizer(override=tiny_tokenizer, model_vocab_size=512)
    enc = ChatEncoder(tok, ChatTemplate())
    prompt, response = "def f(x): return x + 1", "The model reads tokens."
    p = enc.prompt_ids(prompt, 128)
    full_p, full_r = enc.encode_example(prompt, response, 128)
    ids, labels = sft_row(full_p, full_r)
    assert ids[:len(p)] == p and p[0] == tok.bos_id
    # The loss sees exactly the response ids (ending in EOS) and nothing of the prompt.
    assert [l for l in labels if l != IGNORE_INDEX] == full_r == tok.encode(response) + [tok.eos_id]
    assert labels[len(p) - 1] == full_r[0] and all(l == IGNORE_INDEX for l in labels[:len(p) - 1])
    assert len(ids) == len(labels)


def test_truncation_keeps_prompt_end_and_is_counted(tiny_tokenizer):
    tok = load_tokenizer(override=tiny_tokenizer)
    enc = ChatEncoder(tok)
    long_prompt = " ".join(f"word{i}" for i in range(200)) + " final question"
    p, r = enc.encode_example(long_prompt, "short answer", 64)
    assert len(p) + len(r) == 64 and enc.stats.prompts_truncated == 1
    assert tok.decode(p).replace(" ", "").endswith("finalquestion\n<|assistant|>\n")
    assert p[:3] == enc.prompt_ids("x", 64)[:3]  # the template head survives
    assert r == tok.encode("short answer") + [tok.eos_id]


def test_template_saved_with_checkpoint(tmp_path):
    t = ChatTemplate(user_header="Q: ", assistant_header="\nA: ")
    t.save(tmp_path)
    assert ChatTemplate.load(tmp_path) == t
    assert "message['content']" in (tmp_path / "chat_template.jinja").read_text()
    assert ChatTemplate.load(tmp_path / "nothing") == ChatTemplate()


def test_tokenizer_larger_than_model_vocab_is_error(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="512 pieces but the model's vocab_size is 256"):
        load_tokenizer(override=tiny_tokenizer, model_vocab_size=256)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_tokenizer(ckpt=tmp_path)


@pytest.mark.parametrize("which", ["tiny", "llama2"])
def test_hf_chat_template_gives_our_token_ids(which, tiny_tokenizer, tmp_path):
    """A model served through transformers/vLLM sees exactly the ids it was trained on."""
    transformers = require_module("transformers")
    from model.hf import save_hf_tokenizer

    path = tokenizer_for(which, tiny_tokenizer)
    tok, template = load_tokenizer(override=path), ChatTemplate()
    save_hf_tokenizer(path, tmp_path, chat_template=template.jinja())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    encoder = ChatEncoder(tok, template)
    for prompt, answer in [("What does `json.dumps` do?", "Serialize obj to a JSON formatted str."),
                           ("add 3 4", "3 + 4 = 7"), ("two\nlines of prompt", "a\nb"), ("日本語 ✓ café", "ok")]:
        prompt_ids, response_ids = encoder.encode_example(prompt, answer, 200)
        user = [{"role": "user", "content": prompt}]
        rendered = hf.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == prompt_ids + response_ids, prompt
