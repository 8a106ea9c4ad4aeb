#!/usr/bin/env bash
# The test suite (CPU, 8 fake devices for the sharding tests), after set-up and the
# import-layering check.
# Tests marked slow (2-process training, long resume runs, CLI round trips) are skipped
# unless MARKERS is set: `MARKERS= bash launch/test.sh` runs everything.
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test,torch
.venv/bin/lint-imports --no-cache  # the layering contracts in setup.cfg
exec .venv/bin/python -m pytest tests -q -n 2 --dist loadscope --durations=10 -m "${MARKERS-not slow}" "$@"
