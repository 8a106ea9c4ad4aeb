#!/usr/bin/env bash
# The test suite (CPU, 8 fake devices for the sharding tests), after set-up.
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test,torch
exec .venv/bin/python -m pytest tests -q -n 2 --durations=10 "$@"
