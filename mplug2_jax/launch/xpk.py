r"""GKE through xpk (PyPI `xpk`): the `xpk workload create` command for a TPU or GPU
workload, and the environment each process of the resulting JobSet sees.

  python -m mplug2_jax.launch.xpk --cluster C --workload W --image IMAGE \
      (--tpu_type v5p-32 --num_slices 2 | --device_type h100-80gb-8 --num_nodes 4) \
      [--project P] [--zone Z] [--max_restarts 3] [--dry_run] \
      -- python -m mplug2_jax.main --config configs/X.py:ARGS --workdir gs://BUCKET/runs/x

The image is built from docker/Dockerfile.tpu or docker/Dockerfile.gpu. On TPU, xpk's
JobSet sets TPU_WORKER_HOSTNAMES / TPU_WORKER_ID per worker and MEGASCALE_* per slice;
`mplug2_jax.distributed` detects them and calls `jax.distributed.initialize()`, and the
slices form one runtime (a mesh with a `dcn` axis spans them). On GPU, xpk runs one pod
per node and sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (explicit
mode, all of the node's GPUs). `--max_restarts` lets the JobSet restart the workload after
a preemption; the run resumes from the last checkpoint in the gs:// workdir.
`--dry_run` prints the command and, for a TPU workload, the distributed plan of every
worker of every slice.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from mplug2_jax.launch import common, tpu_pod

TPU_ENV = "JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache TF_CPP_MIN_LOG_LEVEL=1"


def command(run: Sequence[str], *, cluster: str, workload: str, image: str,
            tpu_type: str = "", num_slices: int = 1, device_type: str = "",
            num_nodes: int = 1, project: str = "", zone: str = "",
            max_restarts: int = 3) -> list[str]:
  if not run:
    raise common.UsageError("no command after `--`")
  if bool(tpu_type) == bool(device_type):
    raise common.UsageError("give one of --tpu_type (TPU) or --device_type (GPU)")
  out = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}",
         f"--docker-image={image}"]
  if tpu_type:
    tpu_pod.num_workers(tpu_type)  # validates the type
    out += [f"--tpu-type={tpu_type}", f"--num-slices={num_slices}"]
  else:
    out += [f"--device-type={device_type}", f"--num-nodes={num_nodes}"]
  out += [f"--project={project}"] * bool(project) + [f"--zone={zone}"] * bool(zone)
  out.append(f"--max-restarts={max_restarts}")
  env = TPU_ENV if tpu_type else TPU_ENV + " XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
  out.append(f"--command={env} {shlex.join(list(run))}")
  return out


def jobset_env(tpu_type: str, num_slices: int, workload: str) -> list[dict[str, str]]:
  """What a JobSet of `num_slices` slices of `tpu_type` sets per worker (the variables
  JAX's GKE TPU detection reads), for showing and testing the plans."""
  hosts = tpu_pod.num_workers(tpu_type)
  envs = []
  for s in range(num_slices):
    names = ",".join(f"{workload}-slice-job-{s}-{w}.{workload}" for w in range(hosts))
    for w in range(hosts):
      env = {"TPU_WORKER_HOSTNAMES": names, "TPU_WORKER_ID": str(w)}
      if num_slices > 1:
        env.update(MEGASCALE_NUM_SLICES=str(num_slices), MEGASCALE_SLICE_ID=str(s),
                   MEGASCALE_COORDINATOR_ADDRESS=f"{workload}-slice-job-0-0.{workload}:8080")
      envs.append(env)
  return envs


def main(argv: Sequence[str] | None = None) -> int:
  from absl import flags

  from mplug2_jax import cli, distributed
  from mplug2_jax.config_lib import LaunchError

  argv, run = common.split_command(argv)
  fv = flags.FlagValues()
  flags.DEFINE_string("cluster", None, "GKE cluster (xpk cluster create)", flag_values=fv)
  flags.DEFINE_string("workload", None, "workload name", flag_values=fv)
  flags.DEFINE_string("image", None, "image built from docker/Dockerfile.{tpu,gpu}",
                      flag_values=fv)
  flags.DEFINE_string("tpu_type", "", "TPU slice type, e.g. v5p-32", flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN)", flag_values=fv)
  flags.DEFINE_string("device_type", "", "GPU node type, e.g. h100-80gb-8", flag_values=fv)
  flags.DEFINE_integer("num_nodes", 1, "GPU nodes", flag_values=fv)
  flags.DEFINE_string("project", "", "GCP project", flag_values=fv)
  flags.DEFINE_string("zone", "", "zone", flag_values=fv)
  flags.DEFINE_integer("max_restarts", 3, "JobSet restarts (preemptions)", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the command (and per-worker plans) only",
                    flag_values=fv)
  flags.mark_flags_as_required(["cluster", "workload", "image"], flag_values=fv)
  cli.parse(fv, argv, __doc__)
  try:
    cmd = command(run, cluster=fv.cluster, workload=fv.workload, image=fv.image,
                  tpu_type=fv.tpu_type, num_slices=fv.num_slices, device_type=fv.device_type,
                  num_nodes=fv.num_nodes, project=fv.project, zone=fv.zone,
                  max_restarts=fv.max_restarts)
    if fv.dry_run and fv.tpu_type:
      for env in jobset_env(fv.tpu_type, fv.num_slices, fv.workload):
        print("# " + distributed.make_plan(environ=env, sys_root="/nonexistent").describe())
  except (common.UsageError, LaunchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return common.run_steps([shlex.join(cmd)], fv.dry_run)


if __name__ == "__main__":
  sys.exit(main())
