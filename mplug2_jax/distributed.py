r"""Multi-process start-up: the one entry every launcher and entry point goes through.

  flags = define_flags()                 --distributed, --coordinator_address, ... (below)
  plan = make_plan(**flag values, environ=os.environ)      pure: what to initialise, how
  initialize(plan)                       jax.distributed.initialize, before any device use
  preflight(config.mesh, plan)           global devices == mesh product, before any compile
  python -m mplug2_jax.distributed --dry_run     prints this process's plan, touches nothing

Modes (`--distributed`, env MPLUG2_DISTRIBUTED; `auto` takes the first that applies):
  explicit  --coordinator_address host:port --num_processes N --process_id i (or
            JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), optional
            --local_device_ids (JAX_LOCAL_DEVICE_IDS) and --num_hosts (MPLUG2_NUM_HOSTS).
  slurm     an `srun` step with more than one task (SLURM_JOB_ID, SLURM_PROCID, SLURM_NTASKS
            > 1). Every argument is computed here and passed to JAX, so its own SLURM
            detection (jax/_src/clusters/slurm_cluster.py, which gives every process
            `local_device_ids=[SLURM_LOCALID]`, one GPU) never applies. Both layouts work:
              one process per node  (--ntasks-per-node=1): the node's GPUs 0..G-1;
              one process per GPU   (--ntasks-per-node=G): GPU SLURM_LOCALID, or the one GPU
                                    SLURM binds to the task (--gpus-per-task=1);
            in general each of the node's T tasks takes G/T consecutive GPUs. The GPUs per
            node come from SLURM_GPUS_ON_NODE (or SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS), the
            ones this task sees from CUDA_VISIBLE_DEVICES. Coordinator: the first host of
            SLURM_STEP_NODELIST, port JAX_COORDINATOR_PORT or JAX's choice from the job id.
  tpu       a Cloud TPU VM (Google TPU chips on the PCI bus) or a GKE TPU pod (more than
            one worker in TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES, or several slices
            in MEGASCALE_NUM_SLICES): `jax.distributed.initialize()`
            on every host, as big_vision and MaxText do; JAX reads the worker list and this
            worker's id from the TPU VM metadata server (`agent-worker-number`,
            `worker-network-endpoints`) or, on GKE/JobSet, from TPU_WORKER_ID and
            TPU_WORKER_HOSTNAMES, and multi-slice (MEGASCALE_COORDINATOR_ADDRESS,
            MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID) from either
            (jax/_src/clusters/cloud_tpu_cluster.py). A single-host TPU VM initialises too
            (one process), which is harmless.
  mpi       mpirun (OMPI_COMM_WORLD_SIZE > 1): JAX's Open MPI detection.
  none      one process; nothing is initialised.

Checks, each a one-line `LaunchError` before any compile:
  - the coordinator must not resolve to a loopback address when the processes span hosts
    (SLURM nodes, TPU/GKE workers, or --num_hosts > 1): the others would dial themselves;
  - after initialisation, the global device count must equal the product of
    `config.mesh.shape` (when it has no -1) and what the launch asked for (processes x
    local_device_ids).
`--init_timeout` (MPLUG2_INIT_TIMEOUT, default 300 s, JAX's default) bounds the wait for
every process to join.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import math
import os
import re
import socket
import sys
from typing import Mapping, Sequence

from mplug2_jax.config_lib import LaunchError

MODES = ("auto", "none", "explicit", "slurm", "tpu", "mpi")
DEFAULT_INIT_TIMEOUT = 300
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of Cloud TPU chips (v3 .. TPU7x), as JAX lists them in hardware_utils.py.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


@dataclasses.dataclass
class Plan:
  """What `initialize` does. None = left to JAX's detection (TPU, MPI)."""
  mode: str                                   # "" = single process
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: list[int] | None = None
  initialization_timeout: int = DEFAULT_INIT_TIMEOUT
  num_hosts: int = 0                          # 0 = unknown
  host: str = ""                              # this process's host (as the launcher names it)
  coordinator_host: str = ""                  # host of process 0, when known
  expected_devices: int | None = None         # num_processes x len(local_device_ids)
  note: str = ""                              # layout, e.g. "per_node: 8 of 8 GPUs"

  def kwargs(self) -> dict:
    """Arguments of `jax.distributed.initialize`."""
    out = {"initialization_timeout": int(self.initialization_timeout)}
    for key in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
      if getattr(self, key) is not None:
        out[key] = getattr(self, key)
    return out

  def describe(self) -> str:
    if not self.mode:
      return "single process: jax.distributed is not initialised"
    parts = [f"mode {self.mode}"]
    if self.process_id is not None:
      parts.append(f"process {self.process_id} of {self.num_processes}")
    if self.host:
      parts.append(f"host {self.host}")
    if self.coordinator_address:
      parts.append(f"coordinator {self.coordinator_address}")
    if self.local_device_ids is not None:
      parts.append("local_device_ids " + ",".join(map(str, self.local_device_ids)))
    if self.note:
      parts.append(self.note)
    if self.expected_devices:
      parts.append(f"{self.expected_devices} global devices expected")
    if self.mode in ("tpu", "mpi"):
      parts.append("JAX reads the rest from the " +
                   ("TPU metadata / TPU_* variables" if self.mode == "tpu" else "MPI environment"))
    parts.append(f"init timeout {self.initialization_timeout}s")
    return "distributed: " + ", ".join(parts)


# --------------------------------------------------------------------------------------
# Flags (absl), shared by main, evaluate and the launchers' commands.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Flags:
  mode: object
  coordinator: object
  num_processes: object
  process_id: object
  local_device_ids: object
  num_hosts: object
  init_timeout: object

  def plan(self, environ: Mapping[str, str] | None = None) -> Plan:
    return make_plan(self.mode.value, self.coordinator.value, self.num_processes.value,
                     self.process_id.value, self.local_device_ids.value, self.num_hosts.value,
                     self.init_timeout.value, environ=environ)


def define_flags(flag_values=None) -> Flags:
  """The distributed flags on `flag_values` (default absl's global FLAGS)."""
  from absl import flags

  fv = flags.FLAGS if flag_values is None else flag_values
  kw = {"flag_values": fv}
  return Flags(
      mode=flags.DEFINE_enum("distributed", None, MODES,
                             "multi-process start: auto (detect) | none | explicit | slurm | "
                             "tpu | mpi (default: MPLUG2_DISTRIBUTED or auto)", **kw),
      coordinator=flags.DEFINE_string("coordinator_address", "",
                                      "host:port of process 0 (explicit start)", **kw),
      num_processes=flags.DEFINE_integer("num_processes", 0, "processes (explicit start)", **kw),
      process_id=flags.DEFINE_integer("process_id", -1, "this process (explicit start)", **kw),
      local_device_ids=flags.DEFINE_string(
          "local_device_ids", "", "comma-separated local devices of this process "
          "(explicit start; SLURM computes them)", **kw),
      num_hosts=flags.DEFINE_integer(
          "num_hosts", 0, "hosts the processes span (explicit start; 0 = unknown), for the "
          "loopback coordinator check", **kw),
      init_timeout=flags.DEFINE_integer(
          "init_timeout", None, "seconds to wait for every process to join (default "
          f"MPLUG2_INIT_TIMEOUT or {DEFAULT_INIT_TIMEOUT})", **kw))


# --------------------------------------------------------------------------------------
# The plan (pure: environment in, arguments out).
# --------------------------------------------------------------------------------------


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int | None:
  value = env.get(key, "")
  if value == "":
    return default
  try:
    return int(value)
  except ValueError:
    raise LaunchError(f"{key}={value!r} is not an integer") from None


def _ids(text: str, what: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise LaunchError(f"{what}={text!r}: expected comma-separated integers") from None


def tpu_chips(sys_root: str = "/") -> int:
  """Cloud TPU chips on this host's PCI bus (Google's vendor id and a TPU device id)."""
  count = 0
  for vendor in glob.glob(os.path.join(sys_root, "sys/bus/pci/devices/*/vendor")):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as f:
        count += f.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return count


def detect(environ: Mapping[str, str], sys_root: str = "/") -> str:
  """The mode `auto` picks for this environment ("" = single process)."""
  env = environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  if (env.get("SLURM_JOB_ID") and env.get("SLURM_PROCID")
      and (_int(env, "SLURM_NTASKS", 1) or 1) > 1):
    return "slurm"
  # GKE lists the workers (one entry, e.g. "localhost", for a single-host slice: then only
  # several slices need a runtime); a TPU VM has the chips on its PCI bus.
  workers = [h for h in (env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
                         or "").split(",") if h.strip()]
  if (len(workers) > 1 or (_int(env, "MEGASCALE_NUM_SLICES", 1) or 1) > 1
      or tpu_chips(sys_root)):
    return "tpu"
  if (_int(env, "OMPI_COMM_WORLD_SIZE", 1) or 1) > 1:
    return "mpi"
  return ""


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'gpu[003-006,9],cpu1' -> 'gpu003'."""
  nodelist = nodelist.strip()
  m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
  if not m:
    raise LaunchError(f"SLURM nodelist {nodelist!r}: cannot read the first host")
  prefix, ranges = m.group(1), m.group(2)
  if not ranges:
    return prefix
  return prefix + re.split(r"[,-]", ranges)[0]


def _slurm_tasks_per_node(env: Mapping[str, str], ntasks: int, nnodes: int) -> int:
  per_node = _int(env, "SLURM_NTASKS_PER_NODE")
  if per_node:
    return per_node
  for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    text = env.get(key, "")
    if text:  # '8(x4)' or '8,8,8,8' or '2(x3),1'
      return int(re.match(r"\d+", text).group(0))
  return max(ntasks // max(nnodes, 1), 1)


def _slurm_gpus_on_node(env: Mapping[str, str]) -> int | None:
  on_node = _int(env, "SLURM_GPUS_ON_NODE")
  if on_node is not None:
    return on_node
  per_node = env.get("SLURM_GPUS_PER_NODE", "")  # '8' or 'h100:8'
  if per_node:
    return int(per_node.rsplit(":", 1)[-1].split("(")[0])
  gpus = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
  return len([g for g in gpus.split(",") if g.strip()]) or None


def _slurm_plan(env: Mapping[str, str], timeout: int) -> Plan:
  ntasks = _int(env, "SLURM_NTASKS")
  procid = _int(env, "SLURM_PROCID")
  localid = _int(env, "SLURM_LOCALID", 0)
  nnodes = (_int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES")
            or _int(env, "SLURM_JOB_NUM_NODES") or 1)
  nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
  if not nodelist:
    raise LaunchError("SLURM: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set "
                      "(start the processes with srun)")
  coordinator_host = first_host(nodelist)
  port = env.get("JAX_COORDINATOR_PORT") or str(
      _int(env, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))  # JAX's choice
  tasks_per_node = _slurm_tasks_per_node(env, ntasks, nnodes)
  gpus_on_node = _slurm_gpus_on_node(env)
  visible_text = env.get("CUDA_VISIBLE_DEVICES")
  visible = (len([g for g in visible_text.split(",") if g.strip()]) if visible_text
             else gpus_on_node)
  if not visible:  # no GPUs allocated (CPU jobs): every local device
    ids, note = None, "no GPUs allocated: all local devices"
  elif tasks_per_node == 1:
    ids = list(range(visible))
    note = f"one process per node: {visible} of {gpus_on_node or visible} GPUs"
  elif gpus_on_node and visible * tasks_per_node == gpus_on_node and visible != gpus_on_node:
    # SLURM bound this task's share (--gpus-per-task, --gpu-bind): it sees only its GPUs.
    ids = list(range(visible))
    note = f"{tasks_per_node} processes per node, {visible} GPU(s) each (bound by SLURM)"
  elif visible % tasks_per_node == 0:
    k = visible // tasks_per_node
    if localid >= tasks_per_node:
      raise LaunchError(f"SLURM_LOCALID={localid} but {tasks_per_node} tasks per node")
    ids = list(range(localid * k, (localid + 1) * k))
    note = (f"one process per GPU: GPU {localid} of {visible}" if k == 1 else
            f"{tasks_per_node} processes per node, GPUs {ids[0]}-{ids[-1]} of {visible}")
  else:
    raise LaunchError(f"SLURM: {tasks_per_node} tasks per node do not divide the node's "
                      f"{visible} visible GPUs (use --ntasks-per-node=1 or ={visible})")
  return Plan(mode="slurm", coordinator_address=f"{coordinator_host}:{port}",
              num_processes=ntasks, process_id=procid, local_device_ids=ids,
              initialization_timeout=timeout, num_hosts=nnodes,
              host=env.get("SLURMD_NODENAME", ""), coordinator_host=coordinator_host,
              expected_devices=ntasks * len(ids) if ids else None, note=note)


def _tpu_plan(env: Mapping[str, str], timeout: int) -> Plan:
  hosts = [h for h in (env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
                       or "").split(",") if h.strip()]
  slices = _int(env, "MEGASCALE_NUM_SLICES", 1) or 1
  plan = Plan(mode="tpu", initialization_timeout=timeout)
  if hosts:  # GKE / JobSet: the worker list is in the environment
    plan.num_hosts = len(hosts) * slices
    plan.coordinator_host = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or hosts[0]).split(":")[0]
    worker = _int(env, "TPU_WORKER_ID")
    if worker is not None:
      plan.host = hosts[worker].split(":")[0] if worker < len(hosts) else ""
    plan.note = (f"GKE: {len(hosts)} workers per slice x {slices} slice(s), worker "
                 f"{worker} of slice {_int(env, 'MEGASCALE_SLICE_ID', 0)}")
  else:
    plan.note = "TPU VM: worker list and id from the metadata server"
  return plan


def make_plan(mode: str | None = None, coordinator_address: str = "", num_processes: int = 0,
              process_id: int = -1, local_device_ids: str = "", num_hosts: int = 0,
              init_timeout: int | None = None, *, environ: Mapping[str, str] | None = None,
              sys_root: str = "/") -> Plan:
  """The plan for this process from the flags and `environ` (default os.environ)."""
  env = os.environ if environ is None else environ
  mode = mode or env.get("MPLUG2_DISTRIBUTED") or "auto"
  if mode not in MODES:
    raise LaunchError(f"--distributed={mode!r}: must be one of {MODES}")
  timeout = init_timeout or _int(env, "MPLUG2_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT)
  if coordinator_address and mode == "auto":
    mode = "explicit"
  if mode == "auto":
    mode = detect(env, sys_root)
  if mode in ("", "none"):
    return Plan(mode="", initialization_timeout=timeout)
  if mode == "explicit":
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    n = num_processes or _int(env, "JAX_NUM_PROCESSES", 0)
    i = process_id if process_id >= 0 else _int(env, "JAX_PROCESS_ID", -1)
    if not address or n <= 0 or i < 0:
      raise LaunchError("--distributed=explicit needs --coordinator_address, --num_processes "
                        "and --process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                        "JAX_PROCESS_ID)")
    if not 0 <= i < n:
      raise LaunchError(f"--process_id={i} is not in [0, --num_processes={n})")
    ids_text = local_device_ids or env.get("JAX_LOCAL_DEVICE_IDS", "")
    ids = _ids(ids_text, "--local_device_ids") if ids_text else None
    return Plan(mode="explicit", coordinator_address=address, num_processes=n, process_id=i,
                local_device_ids=ids, initialization_timeout=timeout,
                num_hosts=num_hosts or _int(env, "MPLUG2_NUM_HOSTS", 0),
                coordinator_host=address.rsplit(":", 1)[0].strip("[]"),
                expected_devices=n * len(ids) if ids else None)
  if mode == "slurm":
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):
      if not env.get(key):
        raise LaunchError(f"--distributed=slurm but {key} is not set (start with srun)")
    return _slurm_plan(env, timeout)
  if mode == "tpu":
    return _tpu_plan(env, timeout)
  return Plan(mode="mpi", initialization_timeout=timeout)


# --------------------------------------------------------------------------------------
# Checks and initialisation.
# --------------------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
  try:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback
  except ValueError:
    return False


def resolves_to_loopback(host: str) -> bool:
  """True if `host` is a loopback literal or every address it resolves to is loopback
  (False when it does not resolve here: JAX then waits for it and times out clearly)."""
  if host in ("localhost", "localhost.localdomain") or _is_loopback(host):
    return True
  try:
    infos = socket.getaddrinfo(host, None)
  except (socket.gaierror, UnicodeError, OSError):
    return False
  addresses = {info[4][0] for info in infos}
  return bool(addresses) and all(_is_loopback(a) for a in addresses)


def check_coordinator(plan: Plan, this_host: str | None = None) -> None:
  """LaunchError when the processes span hosts and the coordinator is loopback here.

  On the coordinator's own host a name that resolves to 127.0.1.1 (Debian's /etc/hosts)
  is harmless: process 0 binds every interface and the other hosts resolve the name
  through DNS; a literal loopback address or `localhost` is wrong everywhere."""
  host = plan.coordinator_host or (plan.coordinator_address or "").rsplit(":", 1)[0].strip("[]")
  if not host or plan.num_hosts <= 1:
    if host and plan.mode == "explicit" and plan.num_hosts == 0 and resolves_to_loopback(host):
      from absl import logging
      logging.warning("coordinator %s is a loopback address: every process must run on this "
                      "host (--num_hosts > 1 turns this into an error)", host)
    return
  literal = host in ("localhost", "localhost.localdomain") or _is_loopback(host)
  here = (this_host or plan.host or socket.gethostname()).split(".")[0]
  on_coordinator_host = host.split(".")[0] == here
  if literal or (not on_coordinator_host and resolves_to_loopback(host)):
    raise LaunchError(
        f"coordinator {plan.coordinator_address or host} resolves to a loopback address but "
        f"the run spans {plan.num_hosts} hosts: give a routable host name or address of "
        "process 0's host")


def initialize(plan: Plan) -> Plan:
  """Checks the coordinator and calls `jax.distributed.initialize` (nothing for a single
  process). Must run before anything touches a device."""
  if not plan.mode:
    return plan
  check_coordinator(plan)
  import jax
  from absl import logging

  jax.distributed.initialize(**plan.kwargs())
  logging.info("%s; joined: process %d of %d, %d local / %d global devices", plan.describe(),
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return plan


_barriers = 0  # barriers passed by this process (each gets its own id, in the same order)
DEFAULT_BARRIER_TIMEOUT = 3600


def barrier(name: str, timeout_s: int = DEFAULT_BARRIER_TIMEOUT) -> None:
  """Waits until every process reaches this point, at the coordination service (no device
  collective); nothing for a single process.

  For a point where processes may arrive far apart, such as right after compiling: on CPU,
  Gloo gives the process that enters a collective first only 30 s to be joined, and the
  persistent compilation cache serves only process 0 (the CPU cache key differs per process
  and only process 0 writes entries), so process 0 can load the train step a minute before
  process 1 has compiled it."""
  global _barriers
  import jax

  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client orbax's barriers use too

  client = jax_distributed.global_state.client
  if client is None:
    return
  _barriers += 1
  client.wait_at_barrier(f"mplug2_jax/{_barriers}/{name}", int(timeout_s * 1000))


def preflight(mesh_config, plan: Plan | None = None, *, num_devices: int | None = None,
              num_processes: int | None = None, local_devices: int | None = None) -> int:
  """LaunchError (one line naming both numbers) unless the global device count equals the
  mesh product and what the launch asked for; returns the device count. The counts default
  to JAX's (which starts the backend: call after `initialize`)."""
  if num_devices is None:
    import jax

    num_devices, num_processes = jax.device_count(), jax.process_count()
    local_devices = jax.local_device_count()
  have = f"{num_devices} global devices"
  if num_processes is not None and local_devices is not None:
    plural = "es" if num_processes != 1 else ""
    have += f" ({num_processes} process{plural} x {local_devices} local)"
  if plan is not None and plan.expected_devices and plan.expected_devices != num_devices:
    raise LaunchError(f"pre-flight: {have}, but the launch asked for {plan.expected_devices} "
                      f"({plan.num_processes} processes x local_device_ids "
                      f"{plan.local_device_ids})")
  shape = tuple(mesh_config.shape)
  if -1 not in shape and math.prod(shape) != num_devices:
    raise LaunchError(f"pre-flight: {have}, but config.mesh.shape={shape} "
                      f"(axes {tuple(mesh_config.axes)}) needs {math.prod(shape)}")
  if -1 in shape:
    fixed = math.prod(s for s in shape if s != -1)
    if num_devices % fixed:
      raise LaunchError(f"pre-flight: {have}, but the fixed axes of config.mesh.shape={shape} "
                        f"need a multiple of {fixed}")
  return num_devices


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m mplug2_jax.distributed [--nodry_run] [flags]`: this process's plan; with
  --nodry_run also initialises and prints the joined device counts (a cluster smoke test)."""
  from absl import flags

  from mplug2_jax import cli

  fv = flags.FlagValues()
  f = define_flags(fv)
  flags.DEFINE_bool("dry_run", True, "print the plan only (--nodry_run: also initialise)",
                    flag_values=fv)
  cli.parse(fv, argv, __doc__)
  try:
    plan = f.plan()
    check_coordinator(plan)
    print(plan.describe(), flush=True)
    if plan.mode:
      print("jax.distributed.initialize(" + ", ".join(
          f"{k}={v!r}" for k, v in plan.kwargs().items()) + ")", flush=True)
    if not fv.dry_run:
      import jax

      initialize(plan)
      print(f"joined: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices",
            flush=True)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
