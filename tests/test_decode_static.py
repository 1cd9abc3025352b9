"""Static-shape decoding (the step finetune/generate.py captures in a CUDA graph) against the
growing-cache path: same logits at every step for a left-padded batch, and misuse refused."""
import pytest
import torch

from finetune.generate import DecodeStep
from model import Config, Llama


def _prefilled(model, prompts, max_new):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.make_kv_cache(len(prompts), width + max_new)
    logits = model(ids, cache=cache, positions=positions, attention_mask=mask, last_logits_only=True)
    return cache, logits, mask.long().sum(-1, keepdim=True), width


@torch.no_grad()
def test_static_slots_match_growing_cache_every_step():
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny"), kernels="torch").eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    steps = 10
    grow, logits_a, pos, width = _prefilled(model, prompts, steps)
    static, logits_b, _, _ = _prefilled(model, prompts, steps)
    decode = DecodeStep(model, static, len(prompts), first_slot=width, cuda_graph=False)
    for _ in range(steps):
        tok = logits_a[:, -1].argmax(-1)
        assert torch.equal(tok, logits_b[:, -1].argmax(-1))
        logits_a = model(tok[:, None], cache=grow, positions=pos, last_logits_only=True)
        logits_b = decode(tok, pos)
        torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=1e-5)
        pos = pos + 1
    assert static.length == width  # static decoding leaves the host-side length alone
    assert int(decode.slot) == width + steps
    torch.testing.assert_close(static.k[:, :, :width + steps], grow.k[:, :, :width + steps], rtol=0, atol=1e-6)


def test_static_decoding_needs_cache_and_positions():
    model = Llama(Config.from_name("tiny"), kernels="torch").eval()
    with pytest.raises(ValueError, match="cache_slots"):
        model(torch.zeros(1, 1, dtype=torch.long), cache_slots=torch.zeros(1, dtype=torch.long))
