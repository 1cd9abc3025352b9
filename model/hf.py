"""Weight import/export between our Llama and Hugging Face's LlamaForCausalLM / MistralForCausalLM.

Our module fuses q/k/v into one projection and gate/up into another; HF keeps them apart.
RoPE uses the same rotate_half layout on both sides, so no permutation is needed. A Mistral
is a Llama with a sliding window (Config.sliding_window); tied embeddings, explicit head_dim
and RoPE types default/linear/llama3 are read and written back; every other variant (biases,
another activation, other RoPE types, other architectures) is refused naming the field.
Nothing here imports transformers: the HF directory is plain config.json + safetensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from model.atomic import atomic_path, write_bytes, write_json, write_text
from model.config import Config
from model.llama import Llama

# architecture -> (model_type, transformers' defaults for fields a config.json may leave out)
HF_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_HF_DEFAULTS = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "sliding_window": None},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "sliding_window": 4096},
}
# our RoPE field -> its key in HF's rope_scaling / rope_parameters
_ROPE_KEYS = {"rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
              "rope_high_freq_factor": "high_freq_factor", "rope_original_context": "original_max_position_embeddings"}


# ---- config ---------------------------------------------------------------------------
def config_to_hf(config: Config, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2) -> dict:
    """config.json for `config`, in the class it was imported as; transformers 4 and 5 both read it
    (rope_theta/rope_scaling for 4, rope_parameters for 5, the same values in both)."""
    from model.config import ROPE_FIELDS

    scaling = {"rope_type": config.rope_type,
               **{_ROPE_KEYS[f]: getattr(config, f) for f in ROPE_FIELDS[config.rope_type]}}
    out = {
        "architectures": [config.architecture],
        "model_type": HF_MODEL_TYPES[config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": None if config.rope_type == "default" else scaling,
        "rope_parameters": {**scaling, "rope_theta": config.rope_base},
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if config.architecture == "MistralForCausalLM":
        out["sliding_window"] = config.sliding_window  # null: attention over the whole context
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _architecture(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in HF_MODEL_TYPES]
    if known and len(archs) == 1:
        return known[0]
    if not archs:  # an old config.json may name only its model_type
        by_type = {t: a for a, t in HF_MODEL_TYPES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
    raise ValueError(f"{source}: architectures {archs} / model_type {hf.get('model_type')!r} is not a Llama "
                     f"model; only {' and '.join(HF_MODEL_TYPES)} checkpoints can be imported "
                     f"(field 'architectures')")


def _rope_from_hf(hf: dict, max_positions: int, source: str) -> dict:
    """Our rope_* fields from config.json, read as transformers 5 reads them: `rope_scaling`
    (transformers 4's spelling) when set, else `rope_parameters`; rope_theta inside it, else at
    the top level, else 10000."""
    from model.config import ROPE_FIELDS, ROPE_TYPES

    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(field) or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{source}: field {field!r} is {rope!r}; only one RoPE for all layers is supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{source}: unsupported Llama variant: RoPE scaling {field}.rope_type={kind!r} "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: unsupported Llama variant: partial_rotary_factor={partial} "
                         f"(RoPE must rotate the whole head)")
    out = {"rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), "rope_type": kind}
    for ours in ROPE_FIELDS[kind]:
        key = _ROPE_KEYS[ours]
        value = rope.get(key)
        if ours == "rope_original_context":  # transformers' fallbacks for Llama-3.1's pretraining length
            value = hf.get(key, value if value is not None else max_positions)
        if value is None:
            raise ValueError(f"{source}: {field} of rope_type {kind!r} needs {key!r}")
        out[ours] = int(value) if ours == "rope_original_context" else float(value)
    return out


def config_from_hf(hf: dict, source: str = "config.json") -> Config:
    """Our Config for an HF Llama or Mistral config; anything we cannot represent is an error
    naming `source` and the field."""
    arch = _architecture(hf, source)
    defaults = _HF_DEFAULTS[arch]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise ValueError(f"{source}: missing field {key!r}")
    unsupported = [f"{key}=true" for key in ("attention_bias", "mlp_bias") if hf.get(key)]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
    if unsupported:
        raise ValueError(f"{source}: unsupported Llama variant: {', '.join(unsupported)}")
    block_size = hf.get("max_position_embeddings") or defaults["max_position_embeddings"]
    rope = _rope_from_hf(hf, block_size, source)
    window = hf.get("sliding_window", defaults["sliding_window"]) if arch == "MistralForCausalLM" else None
    n_head = hf["num_attention_heads"]
    try:
        return Config(
            name=hf.get("_name_or_path") and Path(str(hf["_name_or_path"])).name or "hf-import",
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_embd=hf["hidden_size"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            intermediate_size=hf["intermediate_size"],
            block_size=block_size,
            norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
            head_dim=hf.get("head_dim"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            architecture=arch,
            **rope,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


# ---- weights --------------------------------------------------------------------------
def state_dict_to_hf(state: dict, config: Config) -> dict:
    """HF's tensors for our state dict; a tied model has no lm_head.weight (transformers ties it)."""
    q_dim, kv_dim = config.q_dim, config.n_kv_head * config.head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split([q_dim, kv_dim, kv_dim], dim=0)
        gate, up = state[ours + "mlp.gate_up.weight"].chunk(2, dim=0)
        out.update({
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


# our name's suffix in a block -> the HF tensors (under model.layers.{i}.) concatenated into it
_BLOCK_PARTS = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": ("mlp.down_proj.weight",),
}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def our_names(config: Config) -> list[str]:
    """Our parameter names (a tied model's lm_head is its embedding: no name of its own), in the
    order state_dict_from_hf builds them."""
    return [*_TOP, *([] if config.tie_embeddings else ["lm_head.weight"]),
            *(f"layers.{i}.{suffix}" for i in range(config.n_layer) for suffix in _BLOCK_PARTS)]


def tensor_from_hf(name: str, hf, source: str = "HF checkpoint") -> torch.Tensor:
    """One of our tensors, `name`, from the HF tensors `hf` (a dict, or an HFTensors reading on demand).
    A tied checkpoint's lm_head.weight, if it stores one, is never read: transformers uses the embedding."""
    def take(key: str) -> torch.Tensor:
        if key not in hf:
            hint = ("; config.json says tie_word_embeddings: false, so the checkpoint needs its own lm_head"
                    if key == "lm_head.weight" else "; is this a LlamaForCausalLM or MistralForCausalLM checkpoint?")
            raise ValueError(f"{source}: missing tensor {key!r}{hint}")
        return hf[key]

    if name in _TOP:
        return take(_TOP[name])
    if name == "lm_head.weight":
        return take("lm_head.weight")
    layer, _, suffix = name.removeprefix("layers.").partition(".")
    if not name.startswith("layers.") or suffix not in _BLOCK_PARTS:
        raise KeyError(f"{name}: not a parameter of our Llama")
    parts = [take(f"model.layers.{layer}.{part}") for part in _BLOCK_PARTS[suffix]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def check_tie(hf, config: Config, embedding: torch.Tensor, source: str) -> None:
    """A tied checkpoint may store lm_head.weight too: the same values are the one tied matrix;
    different ones are refused (transformers 4 ties them, using the embedding; 5 unties them)."""
    if config.tie_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], embedding):
        raise ValueError(f"{source}: tie_word_embeddings is true but the weights hold an lm_head.weight that "
                         f"differs from model.embed_tokens.weight; set tie_word_embeddings to false to use "
                         f"both, or remove lm_head.weight to tie them")


def state_dict_from_hf(hf: dict, config: Config, source: str = "HF checkpoint") -> dict:
    return {name: tensor_from_hf(name, hf, source) for name in our_names(config)}


def _weight_files(directory: Path) -> list[Path]:
    """The files holding an HF directory's tensors (one file, or those its index lists)."""
    single_st, index_st = directory / "model.safetensors", directory / "model.safetensors.index.json"
    single_bin, index_bin = directory / "pytorch_model.bin", directory / "pytorch_model.bin.index.json"
    if single_st.is_file():
        return [single_st]
    if index_st.is_file() or index_bin.is_file():
        index = index_st if index_st.is_file() else index_bin
        files = [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {path.name}, which is not in {directory}")
        return files
    if single_bin.is_file():
        return [single_bin]
    raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or their index files")


def _read_hf_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in _weight_files(directory):
        tensors.update(load_file(str(path)) if path.name.endswith(".safetensors")
                       else torch.load(path, map_location="cpu", weights_only=True))
    return tensors


class HFTensors:
    """An HF directory's tensors by name, each read from disk only when asked for (safetensors
    files through model/tensor_file.py; .bin files memory-mapped by torch.load)."""

    def __init__(self, directory: str | os.PathLike):
        from model.tensor_file import TensorFile

        self.where: dict[str, object] = {}
        for path in _weight_files(Path(directory)):
            if path.name.endswith(".safetensors"):
                source = TensorFile(path)
                self.where.update((name, source) for name in source.keys())
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self.where.update((name, tensors) for name in tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self.where[name]
        return source[name] if isinstance(source, dict) else source.read(name)


def is_hf_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return False
    try:
        data = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError:
        return False
    return "architectures" in data or "model_type" in data


def load_hf(directory: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
            kernels: str = "auto") -> Llama:
    """Our Llama with the weights of an HF Llama or Mistral directory (config.json + safetensors/bin)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected an HF model directory")
    config = config_from_hf(json.loads(config_path.read_text()), source=str(config_path))
    hf_state = _read_hf_tensors(directory)
    state = state_dict_from_hf(hf_state, config, source=str(directory))
    check_tie(hf_state, config, state["embed.weight"], source=str(config_path))
    if config.vocab_size != state["embed.weight"].shape[0]:
        raise ValueError(f"{config_path}: vocab_size {config.vocab_size} but embed_tokens has "
                         f"{state['embed.weight'].shape[0]} rows")
    return Llama.from_state_dict(config, state, device=device, dtype=dtype, kernels=kernels, source=str(directory))


def save_hf(model: Llama, directory: str | os.PathLike, dtype: torch.dtype | None = None,
            bos_id: int = 1, eos_id: int = 2) -> Path:
    """Write config.json, generation_config.json and model.safetensors in HF's layout, as the
    architecture the model was imported as (tied: no lm_head tensor, tie_word_embeddings true)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    dtype = state["embed.weight"].dtype
    hf_state = state_dict_to_hf(state, model.config)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(hf_state, str(tmp), metadata={"format": "pt"})
    write_json(directory / "config.json", config_to_hf(model.config, dtype, bos_id, eos_id))
    write_json(directory / "generation_config.json",
               {"bos_token_id": bos_id, "eos_token_id": eos_id, "max_length": model.config.block_size})
    return directory


def save_hf_tokenizer(tokenizer, directory: str | os.PathLike, chat_template: str | None = None,
                      stop_ids: list[int] | tuple[int, ...] | None = None) -> None:
    """Write the tokenizer files transformers' AutoTokenizer reads, in the source's kind.

    `tokenizer` is a data_prep.tokenizer.Tokenizer, or a path it loads from. A sentencepiece
    source gets tokenizer.model + a LlamaTokenizer tokenizer_config.json + special_tokens_map.json;
    a tokenizer.json source gets its tokenizer.json unchanged, its tokenizer_config.json (added
    tokens and all) with `chat_template` set, and its special_tokens_map.json. `stop_ids` (the
    tokenizer's EOS ids and the template's end-of-turn token) become generation_config.json's
    eos_token_id, a list when there are several, merged into the one save_hf wrote."""
    from data_prep.tokenizer import CONFIG_FILE, GENERATION_FILE, HF_FILE, SP_FILE, SPECIAL_MAP_FILE, Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    named = {k: tok.special_tokens.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if tok.kind == "sentencepiece":
        write_bytes(directory / "tokenizer.model", tok.files[SP_FILE])
        config = {"tokenizer_class": "LlamaTokenizer", **named, "add_bos_token": bool(tok.prefix_ids),
                  "add_eos_token": False, "legacy": False, "model_max_length": 1_000_000}
        if tok.added:
            config["added_tokens_decoder"] = {str(i): {"content": text, "special": special}
                                              for i, (text, special) in sorted(tok.added.items())}
    else:
        write_bytes(directory / HF_FILE, tok.files[HF_FILE])
        config = json.loads(tok.files[CONFIG_FILE]) if CONFIG_FILE in tok.files else \
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000}
        config.update((k, v) for k, v in named.items() if v is not None)
    config.pop("chat_template", None)
    if chat_template:
        config["chat_template"] = chat_template
    write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
    special = json.loads(tok.files[SPECIAL_MAP_FILE]) if SPECIAL_MAP_FILE in tok.files else {}
    special.update((k, v) for k, v in named.items() if v is not None)
    write_text(directory / SPECIAL_MAP_FILE, json.dumps(special, indent=2, ensure_ascii=False))
    stops = list(dict.fromkeys(stop_ids if stop_ids is not None else tok.stop_ids))
    generation_path = directory / GENERATION_FILE
    generation = json.loads(tok.files[GENERATION_FILE]) if GENERATION_FILE in tok.files else {}
    if generation_path.is_file():
        generation.update(json.loads(generation_path.read_text()))
    generation.update(bos_token_id=tok.bos_id, eos_token_id=stops if len(stops) > 1 else stops[0])
    write_json(directory / GENERATION_FILE, generation, indent=2)
