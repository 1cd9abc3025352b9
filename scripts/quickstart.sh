#!/usr/bin/env bash
# The first command: a virtual environment with the project (scripts/setup_env.sh), then
# the whole pipeline with scripts/quickstart.py. Arguments go to quickstart.py (--help).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" ""
exec python scripts/quickstart.py "$@"
