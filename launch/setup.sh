#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs mplug2_jax with the given extras.
# Idempotent: does nothing when setup.py and the extras have not changed since the last run.
#   bash launch/setup.sh [extras, default "test"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
venv=.venv
stamp="$venv/.installed"
want="$(cat setup.py | sha256sum | cut -c1-16) $extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip uv
# uv is ~8x faster than pip. torch (extra "torch") goes through pip, which takes the CPU
# wheel this machine keeps on disk instead of downloading a CUDA build.
spec=".[${extras}]"
if [[ ",$extras," == *",torch,"* ]]; then
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
fi
"$venv/bin/python" -m uv pip install --python "$venv/bin/python" -q -e "$spec"
echo "$want" > "$stamp"
echo "setup: installed mplug2_jax[$extras] into $venv"
