"""The cluster launchers' --dry_run output against faked targets: SLURM 4 nodes x 8 GPUs
in both process layouts (the script, then each task's plan from the variables srun would
set), a 4-worker TPU VM pod (create/sync/clear/start/restart commands), a 2-slice GKE
JobSet through xpk (the command and every worker's plan)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mplug2_jax import distributed
from mplug2_jax.launch import slurm, tpu_pod, xpk
from test_distributed import GPUS, NODES, slurm_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "mplug2_jax.main", "--config", "configs/videoqa.py:large", "--workdir",
         "gs://b/runs/qa"]


def launcher(module, *args):
  return subprocess.run([sys.executable, "-m", f"mplug2_jax.launch.{module}", *args],
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("mode,tasks", [("per_node", 1), ("per_gpu", GPUS)])
def test_slurm_script_and_every_task_plan(mode, tasks):
  text = slurm.script(TRAIN, nodes=NODES, gpus_per_node=GPUS, mode=mode, time="24:00:00")
  assert f"#SBATCH --nodes={NODES}\n" in text and f"#SBATCH --ntasks-per-node={tasks}\n" in text
  assert "#SBATCH --gpus-per-node=8\n" in text and "#SBATCH --signal=TERM@120\n" in text
  assert "export MPLUG2_DISTRIBUTED=slurm\n" in text
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in text
  assert text.rstrip().endswith("srun --kill-on-bad-exit=1 --ntasks-per-node=%d "
                                ".venv/bin/python -m mplug2_jax.main --config "
                                "configs/videoqa.py:large --workdir gs://b/runs/qa" % tasks)
  gpus = set()
  for node in range(NODES):
    for local in range(tasks):
      plan = distributed.make_plan(environ=slurm_env(node, local, tasks))
      gpus |= {(node, g) for g in plan.local_device_ids}
      assert plan.expected_devices == NODES * GPUS
  assert len(gpus) == NODES * GPUS  # 8 of 8 GPUs on each of the 4 nodes
  out = launcher("slurm", f"--nodes={NODES}", f"--mode={mode}", "--dry_run", "--", *TRAIN)
  assert out.returncode == 0 and out.stdout == slurm.script(TRAIN, nodes=NODES, mode=mode)


def test_slurm_xla_flags_exist_in_the_installed_jaxlib():
  """XLA aborts on an unknown flag in XLA_FLAGS when a backend starts."""
  code = "import jax; print(len(jax.devices()))"
  for flags, ok in ((" ".join(slurm.GPU_XLA_FLAGS), True), ("--xla_gpu_no_such_flag=1", False)):
    proc = subprocess.run([sys.executable, "-c", code], env=dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags), capture_output=True, text=True,
        timeout=120)
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]


def test_tpu_pod_dry_run_for_a_4_worker_slice():
  assert [tpu_pod.num_workers(t) for t in ("v4-32", "v5p-64", "v5litepod-16", "v6e-8",
                                           "v3-8")] == [4, 8, 4, 1, 1]
  out = launcher("tpu_pod", "--tpu=pod", "--zone=us-central2-b", "--accelerator_type=v4-32",
                 "--runtime_version=tpu-ubuntu2204-base", "--spot", "--restart_on_preemption",
                 "--dry_run", "--", "python3", *TRAIN)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].startswith("# pod: v4-32, 4 worker(s)")
  create, archive, scp, install, clear, start, loop = lines[1:]
  assert create.endswith("|| gcloud compute tpus tpu-vm create pod --zone=us-central2-b "
                         "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot")
  assert archive.startswith("git archive") and "--worker=all" in scp
  assert "pip install --user -e" in install and "-c constraints.txt" in install
  assert "lsof -t /dev/accel* /dev/vfio/*" in clear and "libtpu_lockfile" in clear
  assert "--worker=all" in start and "nohup python3 -m mplug2_jax.main" in start
  assert "> ~/mplug2_logs/$(hostname).log" in start and "MPLUG2_DISTRIBUTED=tpu" in start
  assert "gs://b/runs/qa/run_status.json" in loop and "delete pod" in loop
  bad = launcher("tpu_pod", "--tpu=pod", "--zone=z", "--restart_on_preemption", "--dry_run",
                 "--", "python3", "-m", "mplug2_jax.main", "--workdir=/tmp/local")
  assert bad.returncode == 2 and "needs the command's --workdir on gs://" in bad.stderr


def test_xpk_two_slices_every_worker_plans_to_initialise():
  out = launcher("xpk", "--cluster=c1", "--workload=qa", "--image=gcr.io/p/m:tpu",
                 "--tpu_type=v5p-32", "--num_slices=2", "--dry_run", "--", "python", *TRAIN)
  assert out.returncode == 0, out.stderr
  plans = [line for line in out.stdout.splitlines() if line.startswith("# distributed:")]
  assert len(plans) == 8 and all("mode tpu" in p for p in plans)
  assert sum("worker 3 of slice 1" in p for p in plans) == 1
  assert out.stdout.splitlines()[-1].startswith(
      "xpk workload create --cluster=c1 --workload=qa --docker-image=gcr.io/p/m:tpu "
      "--tpu-type=v5p-32 --num-slices=2 --max-restarts=3 '--command=")
  envs = xpk.jobset_env("v5p-32", 2, "qa")
  assert len({distributed.make_plan(environ=e, sys_root="/nonexistent").host
              for e in envs}) == 8
  gpu = xpk.command(["python", *TRAIN], cluster="c", workload="w", image="i",
                    device_type="h100-80gb-8", num_nodes=4)
  assert "--device-type=h100-80gb-8" in gpu and "--num-nodes=4" in gpu
  with pytest.raises(ValueError, match="one of --tpu_type"):
    xpk.command(["x"], cluster="c", workload="w", image="i")


def dcn_config():
  """A 2-slice mesh (dcn, data, fsdp, tensor) = (2, 1, 4, 1) on the 8 fake devices, as
  `python -m mplug2_jax.benchmark.plan --dcn 2` builds it."""
  from mplug2_jax import experiment
  from mplug2_jax.benchmark import common

  config = experiment.base_config("tiny", "caption")
  config.model.num_frames = 1
  config.total_steps = 10
  config.mesh.axes = ("dcn",) + tuple(config.mesh.axes)
  config.mesh.shape = (2, 1, 4, 1)
  config.batch_size = 8
  common.set_text_lengths(config, 6)
  return config


def test_dcn_mesh_axis_splits_the_batch_over_slices():
  import jax

  from mplug2_jax import experiment, sharding

  config = dcn_config()
  experiment.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
  assert sharding.batch_sharding(mesh, config).spec[0] == ("dcn", "data", "fsdp")
  config.batch_size = 4  # 8 batch ways
  with pytest.raises(ValueError, match=r"batch_size=4: not divisible by the batch's mesh axes "
                     r"\(dcn x data x fsdp: 8 ways\)"):
    experiment.validate(config, jax.device_count())


@pytest.mark.slow
def test_dcn_mesh_axis_compiles_a_train_step():
  """The plan tool's compile on the 2-slice mesh (the fast test above covers the mesh)."""
  import jax

  from mplug2_jax import sharding
  from mplug2_jax.benchmark import common
  from mplug2_jax.train import state as state_lib, step as step_lib

  config = dcn_config()
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh, config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in common.batch_spec(config).items()}
  setup = state_lib.TrainSetup(config, mesh, batch)
  compiled = step_lib.JittedStep(setup).lower(setup.abstract_sharded_state(), batch).compile()
  assert compiled.memory_analysis() is not None
