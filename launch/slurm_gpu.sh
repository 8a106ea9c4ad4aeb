#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node driving all of its GPUs.
#
#   sbatch --nodes 4 launch/slurm_gpu.sh CONFIG WORKDIR [--config.key=value ...]
#   sbatch --nodes 2 launch/slurm_gpu.sh configs/caption.py:large,data=/data/msrvtt_caption,init=/ckpt/mplug2_large \
#          /shared/runs/caption --config.peak_tflops=989
#
# srun starts `python -m mplug2_jax.main` once per node; `mplug2_jax.train.distributed`
# sees SLURM_JOB_ID / SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which reads
# the coordinator (first node), process count and id from SLURM. WORKDIR must be on a shared
# filesystem. On preemption or time limit SLURM sends SIGTERM (see --signal below): the loop
# saves a checkpoint and exits 0; resubmitting the same command resumes exactly.
#SBATCH --job-name=mplug2
#SBATCH --ntasks-per-node=1          # one JAX process per node (all local GPUs)
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32           # data loading (config.data.num_workers) + host work
#SBATCH --exclusive
#SBATCH --signal=TERM@120            # SIGTERM 2 minutes before the time limit: save, exit
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch [--nodes N] $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

# GPU environment (edit for your cluster):
#   - let XLA use most of each GPU's memory up front (no fragmentation from growth);
#   - NCCL over the cluster fabric; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA if needed;
#   - a persistent compilation cache on shared storage: restarts skip the compile.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export NCCL_DEBUG=WARN
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/.jax_cache}"
export TF_CPP_MIN_LOG_LEVEL=1

# --kill-on-bad-exit: one failing process stops the job instead of hanging the others in a
# collective. `exec` would lose srun's signal forwarding, so srun runs in the foreground.
srun --kill-on-bad-exit=1 .venv/bin/python -m mplug2_jax.main \
    --config "$config" --workdir "$workdir" "$@"
