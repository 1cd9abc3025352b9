"""Model hyper-parameters and the named presets (tinyllama-1.1b, CPU-sized demos, tiny).

A Config is plain data: it is saved as config.json beside every checkpoint and is the
only thing needed to rebuild the network. Parameter and FLOP counts are derived here so
the training log, the benchmarks and the tests agree on them.

Beyond TinyLlama's Llama-2 shape it describes the Llama-family checkpoints people have:
tied embeddings (one matrix for the embedding and lm_head), an explicit head_dim, RoPE
scaling (`rope_type` default, linear or llama3; the tables are model/rope.py) and
Mistral's sliding window. `architecture` is the HF class the weights came from, so an
export writes what was imported. Every field has a default that is TinyLlama's, so a
config.json written before a field existed still loads as it did.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")
# the fields each RoPE type needs (and the only ones it may have)
ROPE_FIELDS = {"default": (), "linear": ("rope_factor",),
               "llama3": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")}
_ALL_ROPE_FIELDS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


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
    # lm_head.weight is embed.weight (one parameter), as Llama-3.2-1B/3B and SmolLM2 have it
    tie_embeddings: bool = False
    # size of one attention head; None (the default) means n_embd // n_head. A config built
    # with None holds the resolved number afterwards, as transformers' configs do.
    head_dim: int | None = None
    # RoPE frequencies: "default" (base only), "linear" (divided by rope_factor) or "llama3"
    # (Llama-3.1's per-band rescaling with the three fields after rope_factor)
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_context: int | None = None  # HF's original_max_position_embeddings
    # Mistral: each token attends to the last `sliding_window` tokens (itself included); None = all before it
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"  # the HF class export writes

    def __post_init__(self):
        problems = []
        for f in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "block_size"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        if self.head_dim is None:
            if self.n_head > 0 and self.n_embd % self.n_head:
                problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                                f"or head_dim given")
            elif self.n_head > 0:
                object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        elif self.head_dim <= 0:
            problems.append(f"head_dim must be positive, got {self.head_dim}")
        if self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if isinstance(self.head_dim, int) and self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        problems += self._rope_problems()
        if self.sliding_window is not None:
            if self.sliding_window <= 0:
                problems.append(f"sliding_window must be positive or None, got {self.sliding_window}")
            if self.architecture != "MistralForCausalLM":
                problems.append(f"sliding_window ({self.sliding_window}) needs architecture MistralForCausalLM "
                                f"({self.architecture} has no sliding window)")
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if problems:
            raise ValueError(f"invalid model config {self.name!r}: " + "; ".join(problems))

    def _rope_problems(self) -> list[str]:
        if self.rope_type not in ROPE_TYPES:
            return [f"rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}"]
        needed = ROPE_FIELDS[self.rope_type]
        problems = [f"rope_type {self.rope_type!r} needs {f}" for f in needed if getattr(self, f) is None]
        problems += [f"{f} is only used by rope_type {'/'.join(t for t, fs in ROPE_FIELDS.items() if f in fs)} "
                     f"(rope_type is {self.rope_type!r})"
                     for f in _ALL_ROPE_FIELDS if f not in needed and getattr(self, f) is not None]
        if self.rope_factor is not None and self.rope_factor <= 0:
            problems.append(f"rope_factor must be positive, got {self.rope_factor}")
        if self.rope_type == "llama3" and not problems and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            problems.append(f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                            f"rope_low_freq_factor ({self.rope_low_freq_factor})")
        return problems

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (n_embd unless head_dim is explicit)."""
        return self.n_head * self.head_dim

    # ---- presets --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        """A named preset, optionally with fields overridden (e.g. vocab_size=4096)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model config {name!r}; valid names: {', '.join(sorted(PRESETS))}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Config field(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        # Built again from the preset's own arguments (not dataclasses.replace): a preset's
        # head_dim is derived, so overriding n_embd or n_head derives it again.
        return cls(**{"name": name, **_PRESET_ARGS[name], **overrides})

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
        """Every parameter once (a tied embedding and lm_head are one matrix)."""
        d, q, kv = self.n_embd, self.q_dim, self.n_kv_head * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        mlp = 3 * d * self.intermediate_size
        block = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.n_layer * block + d

    @property
    def num_non_embedding_params(self) -> int:
        """All parameters but the token embedding (an untied lm_head is a real matmul, so it counts;
        a tied one is the embedding)."""
        return self.num_params - self.vocab_size * self.n_embd

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6·N_matmul + 12·L·(n_head·head_dim)·T (forward + backward, incl.
        attention). N_matmul is the non-embedding parameters plus lm_head's matmul, which a tied
        model runs with the embedding matrix; T is capped at the sliding window, if any."""
        t = self.block_size if seq_len is None else seq_len
        if self.sliding_window is not None:
            t = min(t, self.sliding_window)
        lm_head = self.vocab_size * self.n_embd if self.tie_embeddings else 0
        return 6 * (self.num_non_embedding_params + lm_head) + 12 * self.n_layer * self.q_dim * t


_PRESET_ARGS: dict[str, dict] = {
    # TinyLlama-1.1B (Llama-2 architecture, 1,100,048,384 parameters).
    "tinyllama-1.1b": {},
    # CPU-sized configs for demos; the vocabulary is usually overridden to match a small tokenizer.
    "nano": dict(vocab_size=32000, n_layer=4, n_embd=256, n_head=8, n_kv_head=2, intermediate_size=704,
                 block_size=256),
    "micro": dict(vocab_size=32000, n_layer=8, n_embd=512, n_head=8, n_kv_head=2, intermediate_size=1408,
                  block_size=512),
    "small": dict(vocab_size=32000, n_layer=12, n_embd=768, n_head=12, n_kv_head=4, intermediate_size=2048,
                  block_size=1024),
    # For tests: < 1M parameters, runs in milliseconds on a CPU.
    "tiny": dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=176,
                 block_size=128),
}
PRESETS: dict[str, Config] = {name: Config(name=name, **kwargs) for name, kwargs in _PRESET_ARGS.items()}
