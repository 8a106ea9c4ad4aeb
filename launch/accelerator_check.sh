#!/usr/bin/env bash
# The one prepared accelerator check (mplug2_jax/benchmark/accelerator.py): bf16 matmul
# ceiling, mPLUG-2 train steps at the largest batch that fits, beam-search captioning;
# writes OUT/accelerator.json and OUT/accelerator.md. About 8 minutes on one H100.
#   bash launch/accelerator_check.sh OUT [--cpu_smoke] [--budget_s=450]
# On an accelerator image without ml_collections, put its wheel in ./.whl (see
# docs/performance.md, "Accelerator check") and it is installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash launch/accelerator_check.sh OUT [flags]}"
shift
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import ml_collections" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "accelerator_check: ml_collections is not installed and ./.whl has no wheel of it" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec "$py" -m mplug2_jax.benchmark.accelerator --out="$out" "$@"
