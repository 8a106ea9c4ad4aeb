#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host (worker) of the TPU VM.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   bash launch/tpu_pod.sh my-v5p-64 us-east5-a configs/videoqa.py:large,data=gs://b/msrvtt_qa,init=gs://b/mplug2_large \
#        gs://b/runs/videoqa --config.peak_tflops=459
#
# Every host runs `python -m mplug2_jax.main`; JAX detects the pod (TPU_WORKER_HOSTNAMES,
# set by the TPU VM runtime) and `mplug2_jax.train.distributed` calls
# jax.distributed.initialize(), so no coordinator flags are needed. WORKDIR must be shared
# storage (a gs:// bucket) that every host can write: orbax writes each host's shards and
# the data-iterator state of every process there, and every host must see the datasets.
# The repository is expected at ~/mplug2_jax on each worker (e.g. copied with
#   gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:~/mplug2_jax --worker=all --zone ZONE)
# and set up once with `bash launch/setup.sh tpu` (installs jax[tpu]).
# Preemption: the TPU runtime sends SIGTERM; the loop saves a checkpoint and exits, and the
# same command resumes from it exactly.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
extra="$(printf ' %q' "$@")"

# Environment for every host:
#   - one Python process per host drives all of its local TPU chips;
#   - the XLA flags are common choices for large TPU jobs (async collectives overlap
#     communication with compute); edit for your slice;
#   - a persistent compilation cache on local disk saves the compile on restarts.
remote_env="export JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/jax_compilation;
export LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true';
export TF_CPP_MIN_LOG_LEVEL=1"

gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
set -e
$remote_env
cd ~/mplug2_jax
.venv/bin/python -m mplug2_jax.main --config '$config' --workdir '$workdir' $extra
"
