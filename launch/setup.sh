#!/usr/bin/env bash
# Creates ./.venv (Python 3.11 or 3.12) and installs mplug2_jax with the given extras, at
# the exact tested versions of constraints.txt.
# Idempotent: does nothing when setup.py and the extras have not changed since the last run.
#   bash launch/setup.sh [extras, default "test"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
venv=.venv
stamp="$venv/.installed"
want="$(cat setup.py constraints.txt | sha256sum | cut -c1-16) $extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip >/dev/null
"$venv/bin/python" -m pip install -q --upgrade pip uv
# uv is ~8x faster than pip. torch (extra "torch") goes through pip, which takes the CPU
# wheel this machine keeps on disk instead of downloading a CUDA build.
spec=".[${extras}]"
if [[ ",$extras," == *",torch,"* ]]; then
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
fi
"$venv/bin/python" -m uv pip install --python "$venv/bin/python" -q -c constraints.txt -e "$spec"
# pycocoevalcap's PTB tokenizer and METEOR run on Java.
if ! command -v java >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null) \
      || echo "setup: could not install Java; caption metrics will be unavailable" >&2
  else
    echo "setup: Java not found; install openjdk-17-jre-headless for caption metrics" >&2
  fi
fi
echo "$want" > "$stamp"
echo "setup: installed mplug2_jax[$extras] into $venv"
