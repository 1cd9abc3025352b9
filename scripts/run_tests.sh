#!/usr/bin/env bash
# Runs the test suite on a fresh machine: makes a virtual environment if none is active,
# installs the project with its test extra (CPU PyTorch first where there is no GPU, so pip
# does not pull the multi-GB CUDA build), then runs pytest. Extra arguments go to pytest.
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
echo "== installing the project (pip install -e '.[test]')"
pip install --quiet -e ".[test]"

echo "== running the tests"
set +e
python -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "error: pytest collected no tests; the suite under tests/ is missing or was filtered away" >&2
fi
exit $status
