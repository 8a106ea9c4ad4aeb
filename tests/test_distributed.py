"""`mplug2_jax.distributed` against faked cluster environments (SLURM 4 nodes x 8 GPUs in
both process layouts, a 4-worker TPU VM pod, a 2-slice GKE JobSet): the plans, the
arguments `jax.distributed.initialize` gets (recorded, never called), the loopback
coordinator check and the pre-flight device count. Nothing here starts a runtime."""

from __future__ import annotations

import socket
import subprocess
import sys

import ml_collections
import pytest

from mplug2_jax import distributed
from mplug2_jax.config_lib import LaunchError

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
NODES, GPUS = 4, 8
HOSTS = [f"gpu{n:03d}" for n in range(1, NODES + 1)]


def slurm_env(node: int, localid: int, tasks_per_node: int, **extra) -> dict[str, str]:
  """What `srun` sets for one task of `sbatch --nodes=4 --gpus-per-node=8
  --ntasks-per-node=T`."""
  env = {
      "SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(NODES * tasks_per_node),
      "SLURM_PROCID": str(node * tasks_per_node + localid), "SLURM_LOCALID": str(localid),
      "SLURM_NODEID": str(node), "SLURM_NNODES": str(NODES), "SLURM_STEP_NUM_NODES": str(NODES),
      "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_JOB_NODELIST": "gpu[001-004]",
      "SLURMD_NODENAME": HOSTS[node], "SLURM_GPUS_ON_NODE": str(GPUS),
      "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{NODES})",
      "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(GPUS))),
  }
  env.update(extra)
  return env


@pytest.fixture
def recorded(monkeypatch):
  """jax.distributed.initialize replaced by a recorder; host names resolve to 10.0.0.x."""
  import jax

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))

  def fake_getaddrinfo(host, *args, **kwargs):
    address = "127.0.0.1" if host in ("localhost", "loopy") else "10.0.0.%d" % (
        sum(map(ord, host)) % 250 + 1)
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))]

  monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
  return calls


@pytest.mark.parametrize("tasks_per_node", [1, GPUS], ids=["per_node", "per_gpu"])
def test_slurm_uses_every_gpu_in_both_layouts(recorded, tasks_per_node):
  used = {}  # (node, gpu) -> process
  for node in range(NODES):
    for localid in range(tasks_per_node):
      plan = distributed.make_plan(environ=slurm_env(node, localid, tasks_per_node))
      distributed.initialize(plan)
      kw = recorded[-1]
      assert kw["coordinator_address"] == "gpu001:%d" % (4242 % 4096 + 61440)
      assert kw["num_processes"] == NODES * tasks_per_node
      assert kw["process_id"] == node * tasks_per_node + localid
      for gpu in kw["local_device_ids"]:
        assert (node, gpu) not in used
        used[node, gpu] = kw["process_id"]
      assert plan.expected_devices == NODES * GPUS
  assert len(recorded) == NODES * tasks_per_node
  per_node = [sum(1 for (n, _) in used if n == node) for node in range(NODES)]
  assert per_node == [GPUS] * NODES  # 8 of 8 GPUs on every node
  assert sorted({kw["process_id"] for kw in recorded}) == list(range(NODES * tasks_per_node))


def test_slurm_gpu_bound_per_task_and_other_layouts():
  # --gpus-per-task=1: SLURM shows each task only its GPU, which JAX numbers 0.
  env = slurm_env(2, 5, GPUS, CUDA_VISIBLE_DEVICES="5")
  plan = distributed.make_plan(environ=env)
  assert plan.local_device_ids == [0] and plan.process_id == 21
  # 2 tasks per node take 4 GPUs each.
  plan = distributed.make_plan(environ=slurm_env(1, 1, 2))
  assert plan.local_device_ids == [4, 5, 6, 7] and plan.expected_devices == 32
  # No CUDA_VISIBLE_DEVICES: the GPU count comes from SLURM_GPUS_PER_NODE=type:N.
  env = slurm_env(0, 0, 1, SLURM_GPUS_PER_NODE="h100:8")
  del env["CUDA_VISIBLE_DEVICES"], env["SLURM_GPUS_ON_NODE"]
  assert distributed.make_plan(environ=env).local_device_ids == list(range(8))
  with pytest.raises(LaunchError, match="3 tasks per node do not divide the node's 8"):
    distributed.make_plan(environ=slurm_env(0, 0, 3))
  with pytest.raises(LaunchError, match="SLURM_STEP_NODELIST"):
    env = slurm_env(0, 0, 1)
    del env["SLURM_STEP_NODELIST"], env["SLURM_JOB_NODELIST"]
    distributed.make_plan(environ=env)
  # One task is no distributed run; an explicit --distributed=slurm without srun is an error.
  assert distributed.make_plan(environ=dict(slurm_env(0, 0, 1), SLURM_NTASKS="1")).mode == ""
  with pytest.raises(LaunchError, match="SLURM_PROCID is not set"):
    distributed.make_plan("slurm", environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})


def test_first_host_of_a_hostlist():
  assert distributed.first_host("gpu[003-006,9],cpu1") == "gpu003"
  assert distributed.first_host("node7") == "node7"
  assert distributed.first_host("a-b[10,12]") == "a-b10"


def fake_tpu_vm(root, chips: int = 4):
  """/sys/bus/pci/devices of a TPU v4 VM host (Google vendor id, v4 device id)."""
  for i in range(chips):
    d = root / "sys" / "bus" / "pci" / "devices" / f"0000:00:0{i + 4}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text("0x1ae0\n")
    (d / "device").write_text("0x005e\n")
  other = root / "sys" / "bus" / "pci" / "devices" / "0000:00:01.0"
  other.mkdir(parents=True)
  (other / "vendor").write_text("0x8086\n")
  (other / "device").write_text("0x7110\n")


def test_every_tpu_vm_worker_initialises(recorded, tmp_path):
  """`gcloud ... tpu-vm ssh --worker=all`: no TPU_* variables, the chips on the PCI bus;
  every worker calls jax.distributed.initialize() and JAX reads the metadata."""
  fake_tpu_vm(tmp_path)
  assert distributed.tpu_chips(str(tmp_path)) == 4
  for _ in range(4):
    plan = distributed.make_plan(environ={}, sys_root=str(tmp_path))
    assert plan.mode == "tpu"
    distributed.initialize(plan)
  assert recorded == [{"initialization_timeout": 300}] * 4
  # No chips, no variables: one process, nothing initialised.
  plan = distributed.make_plan(environ={}, sys_root=str(tmp_path / "none"))
  assert plan.mode == "" and distributed.initialize(plan) is plan
  assert len(recorded) == 4


def test_gke_two_slices_every_worker_initialises(recorded):
  """A 2-slice JobSet of 4-host slices (what xpk sets): 8 processes, one runtime."""
  hosts = ",".join(f"job-slice-{{s}}-{w}.job" for w in range(4))
  plans = []
  for s in range(2):
    for w in range(4):
      env = {"TPU_WORKER_HOSTNAMES": hosts.format(s=s), "TPU_WORKER_ID": str(w),
             "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": str(s),
             "MEGASCALE_COORDINATOR_ADDRESS": "job-slice-0-0.job:8080"}
      plan = distributed.make_plan(environ=env, sys_root="/nonexistent")
      distributed.initialize(plan)
      plans.append(plan)
  assert [p.mode for p in plans] == ["tpu"] * 8 and len(recorded) == 8
  assert all(p.num_hosts == 8 and p.coordinator_host == "job-slice-0-0.job" for p in plans)
  assert plans[5].host == "job-slice-1-1.job" and "worker 1 of slice 1" in plans[5].note
  # A single-host GKE slice lists "localhost": one process, unless there are several slices.
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}, "/nonexistent") == ""
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost",
                             "MEGASCALE_NUM_SLICES": "2"}, "/nonexistent") == "tpu"


def test_explicit_flags_env_and_timeout(recorded):
  plan = distributed.make_plan(coordinator_address="10.1.2.3:1234", num_processes=2,
                               process_id=1, local_device_ids="0,1", init_timeout=30,
                               environ={})
  distributed.initialize(plan)
  assert recorded[-1] == {"coordinator_address": "10.1.2.3:1234", "num_processes": 2,
                          "process_id": 1, "local_device_ids": [0, 1],
                          "initialization_timeout": 30}
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
         "MPLUG2_INIT_TIMEOUT": "900"}
  plan = distributed.make_plan(environ=env)
  assert (plan.mode, plan.num_processes, plan.process_id, plan.initialization_timeout) == (
      "explicit", 4, 3, 900)
  assert distributed.detect({"OMPI_COMM_WORLD_SIZE": "4"}, "/nonexistent") == "mpi"
  assert distributed.make_plan("none", environ=env).mode == ""
  with pytest.raises(LaunchError, match="needs --coordinator_address, --num_processes"):
    distributed.make_plan("explicit", environ={})
  with pytest.raises(LaunchError, match="--process_id=2 is not in"):
    distributed.make_plan(coordinator_address="h:1", num_processes=2, process_id=2, environ={})
  with pytest.raises(LaunchError, match="MPLUG2_INIT_TIMEOUT='soon' is not an integer"):
    distributed.make_plan(environ={"MPLUG2_INIT_TIMEOUT": "soon"})
  with pytest.raises(LaunchError, match="--distributed='k8s'"):
    distributed.make_plan("k8s", environ={})


def test_loopback_coordinator_on_several_hosts_is_refused(recorded):
  for address in ("127.0.0.1:1234", "localhost:1234", "loopy:1234"):
    plan = distributed.make_plan(coordinator_address=address, num_processes=8, process_id=3,
                                 num_hosts=2, environ={})
    with pytest.raises(LaunchError, match="loopback address but the run spans 2 hosts"):
      distributed.initialize(plan)
  # One host (the local launcher): loopback is right.
  distributed.initialize(distributed.make_plan(coordinator_address="127.0.0.1:1234",
                                               num_processes=2, process_id=0, environ={}))
  # SLURM whose first node name resolves to loopback on another node.
  env = slurm_env(1, 0, 1, SLURM_STEP_NODELIST="loopy,gpu002")
  with pytest.raises(LaunchError, match="coordinator loopy:"):
    distributed.initialize(distributed.make_plan(environ=env))
  assert len(recorded) == 1


def test_preflight_names_both_numbers():
  mesh = ml_collections.ConfigDict({"shape": (2, 4, 1), "axes": ("data", "fsdp", "tensor")})
  assert distributed.preflight(mesh, num_devices=8, num_processes=2, local_devices=4) == 8
  with pytest.raises(LaunchError, match=r"^pre-flight: 16 global devices \(2 processes x 8 "
                     r"local\), but config.mesh.shape=\(2, 4, 1\) .* needs 8$"):
    distributed.preflight(mesh, num_devices=16, num_processes=2, local_devices=8)
  plan = distributed.make_plan(environ=slurm_env(0, 0, 1))
  with pytest.raises(LaunchError, match="8 global devices .* the launch asked for 32"):
    distributed.preflight(mesh, plan, num_devices=8, num_processes=1, local_devices=8)
  mesh.shape = (-1, 3, 1)
  with pytest.raises(LaunchError, match="need a multiple of 3"):
    distributed.preflight(mesh, num_devices=8, num_processes=1, local_devices=8)


def test_dry_run_prints_the_plan():
  env = dict(slurm_env(3, 7, GPUS), PATH="/usr/bin:/bin", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-m", "mplug2_jax.distributed", "--init_timeout=60"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "process 31 of 32" in proc.stdout and "local_device_ids 7" in proc.stdout
  assert ("jax.distributed.initialize(initialization_timeout=60, coordinator_address="
          f"'gpu001:{4242 % 4096 + 61440}', num_processes=32, process_id=31, local_device_ids=[7])"
          in proc.stdout)
