#!/usr/bin/env bash
# The main job, on a fresh machine: set-up, the embedded demo dataset, a short pretraining
# of the tiny model on it (ITC + ITM + MLM + captioning; loss curves PNG, metrics JSONL and
# TensorBoard events in the workdir), then the golden parity check against the official
# PyTorch mPLUG-2. Evaluation on the held-out demo split joins when the training issue
# closes.
#   bash launch/demo.sh [WORKDIR]        (default ./workdirs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test,torch
py=.venv/bin/python
work="${1:-workdirs/demo}"
mkdir -p "$work"
[[ -d "$work/data/video_retrieval" ]] || $py -m mplug2_jax.data.demo --out "$work/data"
$py -m mplug2_jax.main --config "configs/demo.py:data=$work/data" --workdir "$work/pretrain"
echo "loss curves: $work/pretrain/loss_curves.png; metrics: $work/pretrain/metrics.jsonl"
if [[ -d ../shared/golden/mplug2 ]]; then
  $py -m mplug2_jax.convert.parity ../shared/golden/mplug2/*
fi
