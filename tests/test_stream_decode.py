"""Streaming decode (finetune/inference.py `TextStream`, the one incremental decoder of
scripts/chat.py and scripts/generate.py), token by token, for byte-level BPE (tokenizer.json)
and sentencepiece with byte fallback: text that spans several tokens (é, 日本語, emoji) is
never printed broken, no leading space is lost, and each piece is printed as soon as its
characters are complete. Generation stops on any of several stop ids."""
import pytest
import torch
from conftest import MULTI_BYTE, tokenizer_for

from data_prep.tokenizer import Tokenizer
from finetune.generate import generate_batch
from finetune.inference import TextStream

ANSWERS = [" the model " + MULTI_BYTE + " end", MULTI_BYTE, "日本語😀😀 ✓é", "\n  spaced  out\n", "x"]


@pytest.fixture(params=["bpe", "tiny", "llama2"])
def tok(request, hf_tokenizers, tiny_tokenizer) -> Tokenizer:
    if request.param == "bpe":
        return Tokenizer(hf_tokenizers["chatml"])
    return Tokenizer(tokenizer_for(request.param, tiny_tokenizer))


@pytest.mark.parametrize("with_context", [True, False])
def test_pieces_are_whole_characters_as_soon_as_complete(tok, with_context):
    for answer in ANSWERS:
        context = tok.prefix_ids + tok.encode("Prompt: say it") if with_context else []
        ids = tok.encode(answer)
        assert len(ids) > len(answer.encode()) / 4  # byte pieces: characters span several tokens
        stream = TextStream(tok, context)
        base = tok.decode(context)
        printed, held = "", 0
        for i, token in enumerate(ids):
            piece = stream.push(token)
            assert "\ufffd" not in piece, (answer, i)
            printed += piece
            held += piece == ""
            # Everything complete so far is out: the text of the ids so far, less an unfinished character.
            so_far = tok.decode(context + ids[:i + 1])[len(base):]
            assert printed == so_far.rstrip("\ufffd"), (answer, i)
        printed += stream.flush()
        # The whole text, leading spaces included (sentencepiece drops a word's space at the start
        # of a text: decoding the new ids on their own would lose it).
        expected = tok.decode(context + ids)[len(base):]
        assert printed == stream.text == expected
        if any(ord(c) > 127 for c in answer):
            assert held > 0  # a multi-byte character was held back until its last byte came


def test_generation_stops_on_any_stop_id():
    from model import Config, Llama

    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny"), kernels="torch").eval()
    full = generate_batch(model, [[5, 6, 7], [9]], 12, eos_id=-1, pad_id=0)
    stop = full[0][4]
    first = full[0].index(stop)
    # Either id in the list stops a row; a row that meets none runs to max_new_tokens.
    cut = generate_batch(model, [[5, 6, 7], [9]], 12, eos_id=[511 if stop != 511 else 510, stop], pad_id=0)
    assert cut[0] == full[0][:first + 1]
    assert cut[1] == (full[1][:full[1].index(stop) + 1] if stop in full[1] else full[1])
    assert generate_batch(model, [[5, 6, 7]], 12, eos_id=stop, pad_id=0)[0] == cut[0]
