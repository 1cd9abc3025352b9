"""Model hyper-parameters and the named presets (tinyllama-1.1b, CPU-sized demos, tiny).

A Config is plain data: it is saved as config.json beside every checkpoint and is the
only thing needed to rebuild the network. Parameter and FLOP counts are derived here so
the training log, the benchmarks and the tests agree on them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    vocab_size: int = 32000
    n_layer: int = 22
    n_embd: int = 2048
    n_head: int = 32
    n_kv_head: int = 4
    intermediate_size: int = 5632
    block_size: int = 2048  # context length the model is trained for
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self):
        problems = []
        for f in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "block_size"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.n_head > 0 and (self.n_embd // self.n_head) % 2:
            problems.append(f"head_dim ({self.n_embd // self.n_head}) must be even for RoPE")
        if problems:
            raise ValueError(f"invalid model config {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # ---- presets --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        """A named preset, optionally with fields overridden (e.g. vocab_size=4096)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model config {name!r}; valid names: {', '.join(sorted(PRESETS))}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Config field(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return replace(PRESETS[name], **overrides)

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from model.atomic import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))

    # ---- counts ---------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        d, kv = self.n_embd, self.n_kv_head * self.head_dim
        attn = d * (d + 2 * kv) + d * d
        mlp = 3 * d * self.intermediate_size
        block = attn + mlp + 2 * d
        return 2 * self.vocab_size * d + self.n_layer * block + d

    @property
    def num_non_embedding_params(self) -> int:
        """All parameters but the token embedding (the lm_head is a real matmul, so it counts)."""
        return self.num_params - self.vocab_size * self.n_embd

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6·N_non-embed + 12·L·d·T (forward + backward, incl. attention)."""
        t = self.block_size if seq_len is None else seq_len
        return 6 * self.num_non_embedding_params + 12 * self.n_layer * self.n_embd * t


PRESETS: dict[str, Config] = {
    c.name: c
    for c in [
        # TinyLlama-1.1B (Llama-2 architecture, 1,100,048,384 parameters).
        Config(name="tinyllama-1.1b"),
        # CPU-sized configs for demos; the vocabulary is usually overridden to match a small tokenizer.
        Config(name="nano", vocab_size=32000, n_layer=4, n_embd=256, n_head=8, n_kv_head=2,
               intermediate_size=704, block_size=256),
        Config(name="micro", vocab_size=32000, n_layer=8, n_embd=512, n_head=8, n_kv_head=2,
               intermediate_size=1408, block_size=512),
        Config(name="small", vocab_size=32000, n_layer=12, n_embd=768, n_head=12, n_kv_head=4,
               intermediate_size=2048, block_size=1024),
        # For tests: < 1M parameters, runs in milliseconds on a CPU.
        Config(name="tiny", vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
               intermediate_size=176, block_size=128),
    ]
}
