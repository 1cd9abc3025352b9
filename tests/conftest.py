"""Shared fixtures: a tiny sentencepiece tokenizer trained here (no downloads), paths to
the optional real Llama-2 tokenizer in ../shared/data, `require_module` for test
dependencies (a skip on a laptop, an error in CI), `load_script` for scripts/*.py, and a recorder of the tensor strides a
Triton kernel is launched with."""
from __future__ import annotations

import os

import torch

# Triton decides compiled vs interpreted kernels when `kernels` is first imported, and any
# test module may import it first: without a GPU, run Triton kernels on the CPU interpreter
# for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer.model"


def tokenizer_for(which: str, tiny_tokenizer: Path) -> Path:
    """The tokenizer of a test parametrised over "tiny" and "llama2"; the Llama-2 one is
    optional (../shared/data), and the test is skipped without it."""
    if which == "tiny":
        return tiny_tokenizer
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip("the Llama-2 tokenizer is not in ../shared/data")
    return LLAMA2_TOKENIZER


def load_script(name: str):
    """scripts/<name>.py imported as module `name` (scripts/ is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def in_ci() -> bool:
    """True where the CI environment variable says so (CI=true, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_module(name: str):
    """Import a test dependency. Outside CI a missing one skips the tests that need it (a
    laptop without the test extra); in CI it fails them, so a broken test install cannot
    pass as a run of skips."""
    if not in_ci():
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"CI is set and the test dependency {name!r} does not import ({e}); "
                    f"install the test extra: pip install -e '.[test]'", pytrace=False)


_WORDS = ("the model reads tokens and learns to predict the next one from context while the "
          "optimizer updates weights def return import class self value list dict for in if else "
          "print data shard train loss step batch rank gradient attention head layer norm").split()


def synthetic_text(n_lines: int, seed: int = 0) -> list[str]:
    """Deterministic English-and-code-like lines for corpora and tokenizer training."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if i % 3 == 0:
            lines.append(f"def f{i}(x):\n    return x + {rng.randint(0, 999)}  # {' '.join(words[:3])}")
        else:
            lines.append(" ".join(words).capitalize() + ".")
    return lines


def train_tiny_spm(out_dir: Path, vocab_size: int = 512) -> Path:
    """A Llama-style (BPE, byte fallback, bos=1 eos=2 unk=0) sentencepiece model."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(synthetic_text(2000)) + "\nÄÖÜ naïve café 日本語 ✓\n", encoding="utf-8")
    prefix = out_dir / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """Path to a 512-piece sentencepiece model trained for this test session."""
    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


class LaunchRecorder:
    """Stands in for a `@triton.jit` kernel in its module and records, per launch, the
    strides of the tensor arguments, so a test can check that the kernel itself (not a
    copy made on the way) received a strided view."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.strides: list[list[tuple[int, ...]]] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.strides.append([tuple(a.stride()) for a in args if isinstance(a, torch.Tensor)])
            return launch(*args, **kwargs)

        return record


def record_launches(monkeypatch, module, name: str) -> LaunchRecorder:
    """Replace `module.name` (a Triton kernel) with a LaunchRecorder for this test."""
    recorder = LaunchRecorder(getattr(module, name))
    monkeypatch.setattr(module, name, recorder)
    return recorder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """One random `tiny` model saved three ways, each with the tiny tokenizer: "base" (our
    consolidated format, no chat template, like a pretrained model), "sft" (plus the default
    chat_template.json, like an SFT/SPIN output) and "hf" (an HF export with its Jinja template)."""
    import shutil

    from finetune.chat import ChatTemplate
    from model import Config, Llama
    from model.hf import save_hf, save_hf_tokenizer

    root = tmp_path_factory.mktemp("tiny_ckpts")
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny"), kernels="torch")
    paths = {name: root / name for name in ("base", "sft", "hf")}
    for name in ("base", "sft"):
        model.save(paths[name])
        shutil.copyfile(tiny_tokenizer, paths[name] / "tokenizer.model")
    ChatTemplate().save(paths["sft"])
    save_hf(model, paths["hf"])
    save_hf_tokenizer(tiny_tokenizer, paths["hf"], chat_template=ChatTemplate().jinja())
    return paths


# ---- tiny random Hugging Face models of each architecture we import ----------------------------
# name -> (transformers class, config fields beyond TINY_HF_BASE). All have GQA (4 query heads,
# 2 KV heads) and the tiny tokenizer's 512 ids; their context (64) exceeds the test sequences.
TINY_HF_BASE = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                    initializer_range=0.1)  # larger than HF's 0.02, so attention is far from uniform
TINY_HF_MODELS = {
    # Llama-3.2-style: tied, rope_type llama3, head_dim 16 where hidden/heads is 12. With theta
    # 500000 and an original context of 48 its 8 frequencies fall in all three llama3 bands
    # (wavelengths 6.3 < 48/4: kept; 32.4: interpolated; 167 and longer > 48/1: divided by 8).
    "llama3": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True, head_dim=16,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 48})),
    "linear-rope": ("LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
    # a window of 6 tokens: every test sequence (>= 12 tokens) is longer than it
    "mistral-window": ("MistralForCausalLM", dict(sliding_window=6, tie_word_embeddings=False)),
}


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, Path]:
    """Each TINY_HF_MODELS entry built with random weights by transformers and saved with
    save_pretrained (as a downloaded checkpoint is laid out): name -> directory."""
    transformers = require_module("transformers")
    root = tmp_path_factory.mktemp("tiny_hf")
    paths = {}
    for i, (name, (cls_name, fields)) in enumerate(TINY_HF_MODELS.items()):
        cls = getattr(transformers, cls_name)
        config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
        torch.manual_seed(100 + i)
        model = cls(config_cls(**TINY_HF_BASE, **fields)).eval()
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths
