#!/usr/bin/env bash
# Runs the test suite on a fresh machine: a virtual environment with the project and its
# test extra (scripts/setup_env.sh), then pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" "[test]"

echo "== running the tests"
set +e
python -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "error: pytest collected no tests; the suite under tests/ is missing or was filtered away" >&2
fi
exit $status
