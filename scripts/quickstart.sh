#!/usr/bin/env bash
# The first command: sets up a virtual environment (unless one is active), installs the
# project (CPU PyTorch where there is no GPU), then runs the whole pipeline with
# scripts/quickstart.py. Arguments go to quickstart.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
  echo "== no GPU found: installing the CPU build of PyTorch"
  pip install --quiet "torch==2.13.0" || pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "== installing the project (pip install -e .)"
pip install --quiet -e .
exec python scripts/quickstart.py "$@"
