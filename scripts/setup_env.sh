#!/usr/bin/env bash
# Sourced by quickstart.sh and run_tests.sh: activates a virtual environment (making .venv
# if none is active) and installs the project with the pip extras given as "$1" (e.g.
# "[test]"). Where there is no GPU, the CPU build of PyTorch goes in first, so pip does not
# pull the multi-GB CUDA build.
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
