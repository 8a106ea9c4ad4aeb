#!/usr/bin/env bash
# The main job. Until the training issue lands: the sharded tiny forward of the VideoQA and
# caption models (shapes, loss, timing) and the golden parity check against the official
# PyTorch mPLUG-2. It becomes "pretrain + evaluate on the demo dataset" with training.
#   bash launch/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
py=.venv/bin/python
$py -m mplug2_jax.benchmark --config configs/videoqa.py:tiny --steps 5
$py -m mplug2_jax.benchmark --config configs/caption.py:tiny --steps 5
if [[ -d ../shared/golden/mplug2 ]]; then
  $py -m mplug2_jax.convert.parity ../shared/golden/mplug2/*
fi
