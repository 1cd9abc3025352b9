"""The Llama-2 network: one readable module used by pretraining, SFT, SPIN and generation.

    tokens -> embedding -> n_layer x Block -> RMSNorm -> lm_head -> logits (or the loss)
    Block:  x + Attention(RMSNorm(x))  then  x + MLP(RMSNorm(x))
    Attention: fused qkv projection, RoPE (HF rotate_half layout), causal GQA, output projection
    MLP: fused gate/up projection, SwiGLU, down projection

The element-wise maths (RMSNorm, RoPE, SwiGLU, cross-entropy) comes from `kernels.get_ops`,
so the same module runs fused Triton kernels on CUDA and their PyTorch references on CPU
(`kernels="auto" | "triton" | "torch"`, resolved once per device). Each block takes the
hidden states and one `ForwardContext`, built once per forward: the kernel bundle, the RoPE
rows, the attention rule (causal, documents, KV-cache mask) and the cache. With `targets`, the forward returns the mean loss
through the fused linear+cross-entropy, inside the module that owns lm_head, so FSDP2 has
that weight unsharded there and the full logits are never materialised.

With `config.tie_embeddings` lm_head.weight IS embed.weight: one Parameter, registered
under both names (`named_parameters()` and the optimizer see it once, `state_dict()` shows
both keys); the saved file holds it once, as embed.weight. `config.sliding_window` limits
attention to the most recent tokens (Mistral) in every path: training, documents, KV cache.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

import kernels
from model.atomic import atomic_path
from model.attention import attention
from model.config import Config
from model.document_mask import Documents
from model.rope import rope_cache

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _seeded_normal_(p: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill `p` (a tensor or a sharded DTensor) from N(0, std²) drawn whole with a generator of its own."""
    local = p.to_local() if hasattr(p, "to_local") else p
    if local.is_meta:
        return
    generator = torch.Generator(device=local.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    full = torch.empty(p.shape, dtype=local.dtype, device=local.device)
    nn.init.normal_(full, mean=0.0, std=std, generator=generator)
    if local is not p:
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank cuts its own shard from its identical copy, no communication.
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    local.copy_(full)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: SimpleNamespace) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every layer for batched decoding, plus which slots hold real tokens.

    Slots are shared by all rows (slot j is column j of the batch); a left-padded row marks
    its padding slots invalid, and its positions for RoPE are given per row.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at the current slots; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at `slots` (a device tensor of T slot indices); return every
        slot's keys/values. The shapes never depend on how far decoding has got, so a step
        built on this can be captured once in a CUDA graph and replayed."""
        self.k[layer].index_copy_(1, slots, k)
        self.v[layer].index_copy_(1, slots, v)
        return self.k[layer], self.v[layer]


@dataclass
class ForwardContext:
    """What every block of one forward pass shares, built once by `Llama.forward`.

    `cos`/`sin` are the RoPE rows of this pass's tokens: (T, head_dim), or (B, T, head_dim)
    when positions differ per row (documents, left padding). At most one of `mask` (an explicit
    (B, 1, T, S) mask: KV-cache decoding) and `documents` (attention within documents) is set.
    """

    ops: SimpleNamespace  # the kernel bundle (kernels.get_ops), resolved once per device
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    documents: Documents | None = None
    cache: KVCache | None = None
    cache_slots: torch.Tensor | None = None  # static decoding: the cache slots of the new tokens


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.sliding_window
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=False)
        self.proj = nn.Linear(config.q_dim, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        q, k = ctx.ops.apply_rope(q, k, ctx.cos, ctx.sin)  # new tensors: q, k no longer hold qkv
        if torch.is_grad_enabled():
            # Attention saves v for backward; as a view it would keep the whole qkv output alive
            # (10x v's size with 32/4 heads: ~1.5 GB at 1.1B, micro-batch 8 x 2048, bf16).
            v = v.contiguous()
        if ctx.cache is not None and ctx.cache_slots is not None:
            k, v = ctx.cache.write(self.layer_idx, k, v, ctx.cache_slots)
        elif ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        # An explicit mask (KV cache) and the documents carry the window themselves.
        y = attention(q, k, v, mask=ctx.mask, documents=ctx.documents, window=self.window)
        return self.proj(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, ops: SimpleNamespace) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(ops.swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x, ctx.ops), ctx)
        return x + self.mlp(self.mlp_norm(x, ctx.ops), ctx.ops)


_KERNEL_CHOICES = kernels.BACKENDS


class Llama(nn.Module):
    def __init__(self, config: Config, kernels: str = "auto"):
        super().__init__()
        if kernels not in _KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {_KERNEL_CHOICES}, got {kernels!r}")
        self.config = config
        self.kernels = kernels
        # The kernel bundle per device type, resolved the first time the model runs there (a
        # model is often built on the meta device and only then given its real one).
        self._ops: dict[str, SimpleNamespace] = {}
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        # RoPE tables are not buffers: model.to(bf16) must not round them, and after a
        # meta-device build they are simply made on first use on the input's device.
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.init_weights()

    def tie_weights(self) -> None:
        """With tied embeddings, make lm_head.weight the embedding's Parameter (again: loading
        with assign=True replaces each module's Parameter on its own)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _apply(self, fn, recurse=True):
        # nn.Module._apply gives each module a new Parameter of its own where it cannot convert
        # in place (to_empty() of a meta build, as Fabric materialises a sharded model): tie again.
        # Under FSDP2 this runs inside FSDPModule._apply, before it re-registers its sharded params.
        out = super()._apply(fn, recurse)
        self.tie_weights()
        return out

    # ---- initialisation -------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter in place (also after to_empty() of a meta-device build).

        Weights are normal with the "small init" std sqrt(2 / 5d) (as GPT-NeoX and TinyLlama);
        the two projections that write into the residual stream (attention output and MLP
        down) use GPT-NeoX's 2 / (L·sqrt(d)) so the residual variance does not grow with depth.
        Norm weights start at one. On the meta device this costs nothing.

        Without `seed` the draws come from the global RNG, one parameter after another. With
        `seed` each parameter gets its own generator seeded from (seed, its name) and is drawn
        whole, then each rank keeps its shard (parameters may be FSDP2 DTensors): the same
        seed gives the same weights on any number of ranks, whatever any RNG was before.
        """
        d, n_layer = self.config.n_embd, self.config.n_layer
        std = (2.0 / (5.0 * d)) ** 0.5
        residual_std = 2.0 / (n_layer * d ** 0.5)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
                continue
            sd = residual_std if name.endswith(("attn.proj.weight", "mlp.down.weight")) else std
            if seed is None:
                nn.init.normal_(p, mean=0.0, std=sd)
            else:
                _seeded_normal_(p, sd, seed, name)

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin of shape (block_size, head_dim) on `device`, computed once per device."""
        if device not in self._rope:
            self._rope[device] = rope_cache(self.config, self.config.block_size, device=device)
        return self._rope[device]

    def ops(self, device: torch.device) -> SimpleNamespace:
        """The kernel bundle this model runs on `device` (Triton on CUDA with kernels='auto')."""
        if device.type not in self._ops:
            self._ops[device.type] = kernels.get_ops(kernels.resolve_backend(self.kernels, device))
        return self._ops[device.type]

    # ---- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                ignore_index: int = -100, z_loss: float = 0.0, documents: Documents | None = None,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None,
                last_logits_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or with `targets` (B, T) the mean next-token loss.

        Training and scoring: `documents` (a model.document_mask.Documents the caller builds
        once per micro-batch) restricts each token to earlier tokens of its own document, with
        RoPE positions counted from the document's start, so each document is computed as if
        alone.

        Decoding: pass a `cache` from `make_kv_cache`; the tokens are appended at the cache's
        current length. `positions` (B, T) gives per-row RoPE positions and `attention_mask`
        (B, T, True = real token) marks left padding; both default to "no padding".
        `last_logits_only` returns logits for the last position only (B, 1, vocab).

        Static-shape decoding (`cache_slots`, a device tensor of T slot indices, with
        `positions`): the tokens are written at those slots and attend to every valid slot up
        to theirs, over the cache's full length; `cache.length` is left alone and nothing
        waits for the device, so the step can be captured in a CUDA graph. The caller keeps
        positions and slots within the context and the cache.
        """
        B, T = input_ids.shape
        ctx = self._context(input_ids, documents, cache, positions, attention_mask, cache_slots)
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, ctx)
        if cache is not None and cache_slots is None:
            cache.length += T
        x = self.norm(x, ctx.ops)

        if targets is not None:
            return ctx.ops.fused_linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight,
                                                      targets.reshape(B * T), ignore_index=ignore_index,
                                                      z_loss=z_loss)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def _context(self, input_ids, documents, cache, positions, attention_mask, cache_slots) -> ForwardContext:
        """The RoPE rows and the attention rule of this pass, for its one mode: plain causal,
        within documents, appending to a KV cache, or writing at fixed cache slots."""
        B, T = input_ids.shape
        rope_cos, rope_sin = self.rope_tables(input_ids.device)
        ctx = ForwardContext(ops=self.ops(input_ids.device), cos=rope_cos, sin=rope_sin,
                             documents=documents, cache=cache, cache_slots=cache_slots)
        window = self.config.sliding_window
        if documents is not None:
            if cache is not None or positions is not None:
                raise ValueError("documents (attention within documents) are for training and scoring; "
                                 "they cannot be combined with a KV cache or explicit positions")
            if documents.batch != B or documents.seq_len != T:
                raise ValueError(f"documents were built for a ({documents.batch}, {documents.seq_len}) batch, "
                                 f"got input_ids of shape ({B}, {T})")
            positions = documents.positions
        elif cache_slots is not None:
            if cache is None or positions is None:
                raise ValueError("cache_slots (static decoding) needs a cache and per-row positions")
            ctx.mask = self._static_cache_mask(cache, cache_slots, window)
        elif cache is not None:
            ctx.mask = self._cache_mask(cache, B, T, attention_mask, input_ids.device, window)
        elif attention_mask is not None:
            raise ValueError("attention_mask is only used with a KV cache; for training pad on the right "
                             "and set the padded targets to ignore_index")

        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the model's context "
                                 f"(block_size={self.config.block_size})")
            ctx.cos, ctx.sin = rope_cos[start:start + T], rope_sin[start:start + T]
        else:
            if documents is None and cache_slots is None and int(positions.max()) >= self.config.block_size:
                raise ValueError(f"position {int(positions.max())} exceeds the model's context "
                                 f"(block_size={self.config.block_size})")
            ctx.cos, ctx.sin = rope_cos[positions], rope_sin[positions]
        return ctx

    @staticmethod
    def _cache_mask(cache: KVCache, B: int, T: int, attention_mask, device, window: int | None = None
                    ) -> torch.Tensor:
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; {start} used, {T} more requested")
        if cache.valid.shape[0] != B:
            raise ValueError(f"KV cache was made for batch {cache.valid.shape[0]}, got batch {B}")
        new_valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None \
            else attention_mask.to(device=device, dtype=torch.bool)
        cache.valid[:, start:start + T] = new_valid
        key_slot = torch.arange(start + T, device=device)
        query_slot = torch.arange(start, start + T, device=device)
        causal = key_slot[None, :] <= query_slot[:, None]
        if window is not None:
            # A row's slots are its positions shifted by its padding, so slot distance is token distance.
            causal = causal & (key_slot[None, :] > query_slot[:, None] - window)
        # A padding query may see only itself, so its (unused) output stays finite.
        itself = key_slot[None, :] == query_slot[:, None]
        allowed = causal[None] & (cache.valid[:, None, :start + T] | itself[None])
        return allowed[:, None]  # (B, 1, T, S)

    @staticmethod
    def _static_cache_mask(cache: KVCache, slots: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """(B, 1, T, max_len): each new token sees the valid slots up to its own (its own included),
        and with a sliding window only the `window` most recent of them."""
        cache.valid.index_fill_(1, slots, True)
        key_slot = torch.arange(cache.max_len, device=slots.device)
        seen = key_slot[None, None, :] <= slots[None, :, None]
        if window is not None:
            seen = seen & (key_slot[None, None, :] > slots[None, :, None] - window)
        allowed = cache.valid[:, None, :] & seen
        return allowed[:, None]

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ValueError(f"KV cache length {max_len} exceeds block_size {self.config.block_size}")
        dtype = dtype or self.lm_head.weight.dtype
        device = device or self.lm_head.weight.device
        return KVCache(self.config, batch_size, max_len, dtype, device)

    # ---- consolidated checkpoint ----------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors (dtype preserved), each atomically. A tied
        lm_head is not written: it is embed.weight (safetensors refuses shared tensors anyway)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not (k == "lm_head.weight" and self.config.tie_embeddings)}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        self.config.save(directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
             kernels: str = "auto") -> "Llama":
        """Rebuild a model saved with `save`; weights keep their saved dtype unless `dtype` is given."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: a consolidated checkpoint "
                                        f"needs {CONFIG_FILE} and {WEIGHTS_FILE} (written by Llama.save)")
        config = Config.load(directory / CONFIG_FILE)
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        return cls.from_state_dict(config, state, device=device, dtype=dtype, kernels=kernels,
                                   source=str(directory / WEIGHTS_FILE))

    @classmethod
    def from_state_dict(cls, config: Config, state: dict, device="cpu", dtype=None, kernels: str = "auto",
                        source: str = "state dict") -> "Llama":
        with torch.device("meta"):
            model = cls(config, kernels=kernels)
        state = _untie_state(state, config, source)
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match config {config.name!r}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for key, tensor in model.state_dict().items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                                 f"config {config.name!r} expects {tuple(tensor.shape)}")
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        return model.to(device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _untie_state(state: dict, config: Config, source: str) -> dict:
    """A tied model's weights with lm_head.weight given as the embedding (a saved file holds
    only embed.weight; a gathered state dict holds both keys, which must then agree)."""
    if not config.tie_embeddings or "embed.weight" not in state:
        return state
    head = state.get("lm_head.weight")
    if head is not None and head is not state["embed.weight"] and not torch.equal(head, state["embed.weight"]):
        raise ValueError(f"{source}: config {config.name!r} ties the embeddings (tie_embeddings) but "
                         f"lm_head.weight differs from embed.weight")
    return {**state, "lm_head.weight": state["embed.weight"]}
