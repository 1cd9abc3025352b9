"""The Llama-2 network: one readable module used by pretraining, SFT, SPIN and generation.

    tokens -> embedding -> n_layer x Block -> RMSNorm -> lm_head -> logits (or the loss)
    Block:  x + Attention(RMSNorm(x))  then  x + MLP(RMSNorm(x))
    Attention: fused qkv projection, RoPE (HF rotate_half layout), causal GQA, output projection
    MLP: fused gate/up projection, SwiGLU, down projection

The element-wise maths (RMSNorm, RoPE, SwiGLU, cross-entropy) comes from `kernels.get_ops`,
so the same module runs fused Triton kernels on CUDA and their PyTorch references on CPU
(`kernels="auto" | "triton" | "torch"`). With `targets`, the forward returns the mean loss
through the fused linear+cross-entropy, inside the module that owns lm_head, so FSDP2 has
that weight unsharded there and the full logits are never materialised.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

import kernels
from model.attention import attention
from model.config import Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def rope_cache(config: Config, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim) in fp32, HF rotate_half layout."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return kernels.get_ops(backend).rms_norm(x, self.weight, self.eps)


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


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, backend: str, cache: KVCache | None = None, mask=None, cache_slots=None,
                documents=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        q, k = kernels.get_ops(backend).apply_rope(q, k, cos, sin)
        if cache is not None and cache_slots is not None:
            k, v = cache.write(self.layer_idx, k, v, cache_slots)
        elif cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, mask=mask, documents=documents)
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(kernels.get_ops(backend).swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, backend: str, cache: KVCache | None = None, mask=None, cache_slots=None,
                documents=None):
        x = x + self.attn(self.attn_norm(x, backend), cos, sin, backend, cache, mask, cache_slots, documents)
        return x + self.mlp(self.mlp_norm(x, backend), backend)


class Llama(nn.Module):
    def __init__(self, config: Config, kernels: str = "auto"):
        super().__init__()
        self.config = config
        self.kernels = kernels
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # RoPE tables are not buffers: model.to(bf16) must not round them, and after a
        # meta-device build they are simply made on first use on the input's device.
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter in place (also after to_empty() of a meta-device build).

        Weights are normal with the "small init" std sqrt(2 / 5d) (as GPT-NeoX and TinyLlama);
        the two projections that write into the residual stream (attention output and MLP
        down) use GPT-NeoX's 2 / (L·sqrt(d)) so the residual variance does not grow with depth.
        Norm weights start at one. On the meta device this costs nothing.
        """
        d, n_layer = self.config.n_embd, self.config.n_layer
        std = (2.0 / (5.0 * d)) ** 0.5
        residual_std = 2.0 / (n_layer * d ** 0.5)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin of shape (block_size, head_dim) on `device`, computed once per device."""
        if device not in self._rope:
            self._rope[device] = rope_cache(self.config, self.config.block_size, device=device)
        return self._rope[device]

    # ---- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                ignore_index: int = -100, z_loss: float = 0.0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                last_logits_only: bool = False, cache_slots: torch.Tensor | None = None,
                document_eos: int | None = None, document_backend: str = "auto") -> torch.Tensor:
        """Logits (B, T, vocab), or with `targets` (B, T) the mean next-token loss.

        Decoding: pass a `cache` from `make_kv_cache`; the tokens are appended at the cache's
        current length. `positions` (B, T) gives per-row RoPE positions and `attention_mask`
        (B, T, True = real token) marks left padding; both default to "no padding".
        `last_logits_only` returns logits for the last position only (B, 1, vocab).

        Static-shape decoding (`cache_slots`, a device tensor of T slot indices, with
        `positions`): the tokens are written at those slots and attend to every valid slot up
        to theirs, over the cache's full length; `cache.length` is left alone and nothing
        waits for the device, so the step can be captured in a CUDA graph. The caller keeps
        positions and slots within the context and the cache.

        Attention within documents (`document_eos`, training and scoring only): each token
        attends to earlier tokens of its own document (documents end with that EOS id) and
        its RoPE position counts from the document's start, so each document is computed as
        if alone (model/document_mask.py; `document_backend` forces a kernel).
        """
        B, T = input_ids.shape
        backend = kernels.resolve_backend(self.kernels, input_ids.device)
        start = cache.length if cache is not None else 0
        rope_cos, rope_sin = self.rope_tables(input_ids.device)
        documents = None
        if document_eos is not None:
            if cache is not None or positions is not None:
                raise ValueError("document_eos (attention within documents) is for training and scoring; "
                                 "it cannot be combined with a KV cache or explicit positions")
            from model.document_mask import Documents, document_attention_backend

            kernel = document_attention_backend(input_ids.device, self.lm_head.weight.dtype, document_backend)
            documents = Documents(input_ids, document_eos, kernel)
            positions = documents.positions
            cos, sin = rope_cos[positions], rope_sin[positions]
        elif cache_slots is not None:
            if cache is None or positions is None:
                raise ValueError("cache_slots (static decoding) needs a cache and per-row positions")
            cos, sin = rope_cos[positions], rope_sin[positions]
        elif positions is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the model's context "
                                 f"(block_size={self.config.block_size})")
            cos, sin = rope_cos[start:start + T], rope_sin[start:start + T]
        else:
            if int(positions.max()) >= self.config.block_size:
                raise ValueError(f"position {int(positions.max())} exceeds the model's context "
                                 f"(block_size={self.config.block_size})")
            cos, sin = rope_cos[positions], rope_sin[positions]

        mask = None
        if cache_slots is not None:
            mask = self._static_cache_mask(cache, cache_slots)
        elif cache is not None:
            mask = self._cache_mask(cache, B, T, attention_mask, input_ids.device)
        elif attention_mask is not None:
            raise ValueError("attention_mask is only used with a KV cache; for training pad on the right "
                             "and set the padded targets to ignore_index")

        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, backend, cache, mask, cache_slots, documents)
        if cache is not None and cache_slots is None:
            cache.length += T
        x = self.norm(x, backend)

        if targets is not None:
            ops = kernels.get_ops(backend)
            return ops.fused_linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight,
                                                  targets.reshape(B * T), ignore_index=ignore_index,
                                                  z_loss=z_loss)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(x)

    @staticmethod
    def _cache_mask(cache: KVCache, B: int, T: int, attention_mask, device) -> torch.Tensor:
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
        # A padding query may see only itself, so its (unused) output stays finite.
        itself = key_slot[None, :] == query_slot[:, None]
        allowed = causal[None] & (cache.valid[:, None, :start + T] | itself[None])
        return allowed[:, None]  # (B, 1, T, S)

    @staticmethod
    def _static_cache_mask(cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, max_len): each new token sees the valid slots up to its own (its own included)."""
        cache.valid.index_fill_(1, slots, True)
        key_slot = torch.arange(cache.max_len, device=slots.device)
        allowed = cache.valid[:, None, :] & (key_slot[None, None, :] <= slots[None, :, None])
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
        """Write config.json + model.safetensors (dtype preserved), each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp_weights = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
        tmp_config = directory / f".{CONFIG_FILE}.tmp-{os.getpid()}"
        try:
            save_file(state, str(tmp_weights), metadata={"format": "pt"})
            self.config.save(tmp_config)
            os.replace(tmp_weights, directory / WEIGHTS_FILE)
            os.replace(tmp_config, directory / CONFIG_FILE)
        finally:
            tmp_weights.unlink(missing_ok=True)
            tmp_config.unlink(missing_ok=True)
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
        return model.to(device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
