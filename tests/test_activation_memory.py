"""Activation memory (issue 26, item 3): what a block saves for backward, counted by storage
with saved_tensors_hooks, and the CUDA allocator's expandable segments by default."""
from __future__ import annotations

import torch

from model import Config, Llama
from model.llama import ForwardContext
from pretrain.engine import ALLOC_CONF, configure_cuda_allocator


def saved_storages(fn, params) -> dict[int, tuple[int, int]]:
    """{storage pointer: (storage bytes, bytes of the saved views on it)} of the activations
    (not the parameters) that `fn()` saves for backward."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    found: dict[int, list] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            entry = found.setdefault(storage.data_ptr(), [storage.nbytes(), set()])
            entry[1].add((t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    out = {}
    for ptr, (nbytes, views) in found.items():
        # bytes the saved views really cover (their union, for views that do not overlap)
        out[ptr] = (nbytes, min(nbytes, sum(torch.Size(shape).numel() * size for _, shape, _, size in views)))
    return out


def test_attention_saves_no_storage_larger_than_what_it_uses():
    config = Config.from_name("tiny", block_size=32)  # 4 query heads, 2 KV heads of 16
    model = Llama(config, kernels="torch")
    B, T = 2, 32
    x = torch.randn(B, T, config.n_embd, requires_grad=True)
    cos, sin = model.rope_tables(x.device)
    attn = model.layers[0].attn
    qkv_out = []
    attn.qkv.register_forward_hook(lambda m, i, o: qkv_out.append(o.untyped_storage().data_ptr()))
    ctx = ForwardContext(ops=model.ops(x.device), cos=cos[:T], sin=sin[:T])
    saved = saved_storages(lambda: attn(x, ctx), model.parameters())
    # v saved as a view of the fused qkv output would keep all (4 + 2 + 2) heads alive for backward.
    assert qkv_out[0] not in saved
    wasted = {ptr: nbytes - used for ptr, (nbytes, used) in saved.items() if nbytes > used}
    assert not wasted, wasted
    # what is left for v: (B, T, 2 KV heads, 16) fp32, once
    v_bytes = B * T * config.n_kv_head * config.head_dim * 4
    assert sorted(n for n, _ in saved.values()).count(v_bytes) >= 1


def test_no_copy_of_v_without_autograd():
    """Generation (no_grad) keeps v a view: nothing is saved, so the copy would only cost time."""
    config = Config.from_name("tiny", block_size=32)
    model = Llama(config, kernels="torch").eval()
    copies = []
    original = torch.Tensor.contiguous
    torch.Tensor.contiguous = lambda self, *a, **k: (copies.append(self.shape), original(self, *a, **k))[1]
    try:
        with torch.no_grad():
            model(torch.randint(0, config.vocab_size, (1, 8)))
    finally:
        torch.Tensor.contiguous = original
    assert (1, 8, config.n_kv_head, config.head_dim) not in copies


def test_expandable_segments_by_default_without_overriding_the_user():
    env = {}
    assert configure_cuda_allocator("expandable", env) == "expandable_segments:True"
    assert env == {ALLOC_CONF: "expandable_segments:True"}
    env = {ALLOC_CONF: "max_split_size_mb:512"}
    configure_cuda_allocator("expandable", env)
    assert env[ALLOC_CONF] == "max_split_size_mb:512,expandable_segments:True"
    env = {ALLOC_CONF: "expandable_segments:False"}  # the user's choice stands
    configure_cuda_allocator("expandable", env)
    assert env[ALLOC_CONF] == "expandable_segments:False"
    env = {}
    assert configure_cuda_allocator("default", env) == "PyTorch's default" and env == {}
