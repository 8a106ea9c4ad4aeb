#!/usr/bin/env bash
# The main job, on a fresh machine: set-up, then `python -m mplug2_jax.demo_job`: the
# embedded demo dataset, a short pretraining of the tiny model on it (ITC + ITM + MLM +
# captioning), caption and video-QA fine-tuning, evaluation of the trained and untrained
# models on the held-out split, and the results table (printed and in
# WORKDIR/results.md; loss-curve PNGs, metrics JSONL and TensorBoard events per stage).
# Last, the golden parity checks against the official PyTorch mPLUG-2 and mPLUG-Owl2.
#   bash launch/demo.sh [WORKDIR]        (default ./workdirs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test,torch
py=.venv/bin/python
work="${1:-workdirs/demo}"
$py -m mplug2_jax.demo_job --workdir "$work"
if [[ -d ../shared/golden/mplug2 ]]; then
  $py -m mplug2_jax.convert.parity ../shared/golden/mplug2/*
fi
if [[ -d ../shared/golden/owl2 ]]; then
  $py -m mplug2_jax.convert.parity ../shared/golden/owl2/*
fi
