"""Multi-process start-up: `jax.distributed.initialize` when the environment asks for it.

  maybe_initialize(coordinator_address="", num_processes=0, process_id=-1) -> str

Detected, in this order (the first that applies wins):
  explicit   --coordinator_address host:port --num_processes N --process_id i (main.py flags),
             or the same as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  SLURM      SLURM_JOB_ID with SLURM_NTASKS > 1 (one task per host or per GPU, `srun`):
             JAX reads the coordinator, process count and id from SLURM itself
  TPU pod    more than one host in TPU_WORKER_HOSTNAMES (Cloud TPU VMs), or a Megascale
             (multi-slice) coordinator: JAX asks the TPU metadata
  OpenMPI    OMPI_COMM_WORLD_SIZE > 1 (mpirun)
Otherwise a single process: nothing is done. Must run before anything touches a device.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def detect(environ=None) -> str:
  """Which multi-process launcher the environment shows ("" = none)."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  return ""


def maybe_initialize(coordinator_address: str = "", num_processes: int = 0,
                     process_id: int = -1, environ=None) -> str:
  """Initializes jax.distributed if needed; returns how ("" = single process)."""
  env = os.environ if environ is None else environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  if coordinator_address:
    num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1"))
    if num_processes <= 0 or process_id < 0:
      raise ValueError("--coordinator_address needs --num_processes and --process_id "
                       "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    how = "explicit"
  else:
    how = detect(env)
    if not how:
      return ""
    # SLURM, TPU and OpenMPI clusters are auto-detected by JAX itself.
    jax.distributed.initialize()
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return how
