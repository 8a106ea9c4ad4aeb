r"""Cloud TPU VM slices: create or reuse the slice, put the code on every worker, clear
stale TPU holders, and start the same command on all workers under `nohup`.

  python -m mplug2_jax.launch.tpu_pod --tpu NAME --zone ZONE --accelerator_type v5p-32 \
      [--project P] [--runtime_version V] [--spot] [--sync code|wheel|none] \
      [--wheel dist/mplug2_jax-*.whl] [--workdir gs://BUCKET/runs/x] \
      [--restart_on_preemption] [--poll_s 300] [--dry_run] \
      -- python -m mplug2_jax.main --config configs/X.py:ARGS --workdir gs://BUCKET/runs/x

Steps (each a `gcloud` command, printed before it runs; `--dry_run` prints them only):
  1. create: `describe` the TPU; create it when missing (`--spot` for Spot capacity).
  2. sync: `git archive HEAD` copied to every worker and installed with
     `pip install -e '.[tpu]' -c constraints.txt` (`--sync wheel`: a built wheel instead).
  3. clear: kill processes holding /dev/accel* or /dev/vfio/* (a crashed run keeps the
     chips busy) and remove /tmp/libtpu_lockfile.
  4. start: `cd ~/mplug2_jax && nohup COMMAND > ~/mplug2_logs/<worker host>.log` on every
     worker (`--worker=all`); every process calls `jax.distributed.initialize()` through
     `mplug2_jax.distributed` (a TPU VM is detected from its chips), and the JAX worker list
     comes from the TPU metadata server.
With `--restart_on_preemption` the launcher removes `WORKDIR/run_status.json` before each
start and then polls the slice state and that file (written when a run ends) every
`--poll_s` seconds: a PREEMPTED/TERMINATED slice is deleted and recreated and steps 1-4
rerun; a run that ended `preempted` on a live slice (host maintenance) reruns steps 3-4;
either way the run resumes from the last checkpoint in the gs:// workdir. `done` (or
`stopped`, from --stop_after) ends the loop.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

from mplug2_jax.launch import common

REMOTE_DIR = "~/mplug2_jax"
LOG_DIR = "~/mplug2_logs"
# TPU environment on every worker: a persistent compilation cache on local disk (restarts
# skip the compile); LIBTPU_INIT_ARGS stays the user's (libtpu's defaults otherwise).
REMOTE_ENV = ("export JAX_COMPILATION_CACHE_DIR=$HOME/.cache/jax_compilation "
              "TF_CPP_MIN_LOG_LEVEL=1 MPLUG2_DISTRIBUTED=tpu")


def num_workers(accelerator_type: str) -> int:
  """Hosts of a slice type: v2/v3/v4/v5p count TensorCores (8 per host); v5e (v5litepod) and
  v6e count chips (up to 8 on one host, 4 per host beyond)."""
  m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type)
  if not m:
    raise common.UsageError(f"--accelerator_type={accelerator_type!r}: expected e.g. "
                            "v4-32, v5p-64, v5litepod-16, v6e-32")
  family, n = m.group(1), int(m.group(2))
  if family in ("v5litepod", "v5e", "v6e"):
    return 1 if n <= 8 else n // 4
  return max(n // 8, 1)


class Pod:
  """The gcloud commands for one slice."""

  def __init__(self, tpu: str, zone: str, project: str = ""):
    self.tpu, self.zone, self.project = tpu, zone, project

  def _gcloud(self, verb: str, *args: str) -> str:
    base = ["gcloud", "compute", "tpus", "tpu-vm", verb, self.tpu, f"--zone={self.zone}"]
    if self.project:
      base.append(f"--project={self.project}")
    return shlex.join(base + list(args))

  def scp_all(self, local: str, remote: str) -> str:
    args = ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.tpu}:{remote}",
            f"--zone={self.zone}", "--worker=all"]
    return shlex.join(args + ([f"--project={self.project}"] if self.project else []))

  def ssh_all(self, remote: str) -> str:
    return self._gcloud("ssh", "--worker=all", f"--command={remote}")

  def describe_state(self) -> str:
    return self._gcloud("describe", "--format=value(state)")

  def create(self, accelerator_type: str, runtime_version: str, spot: bool) -> str:
    args = [f"--accelerator-type={accelerator_type}", f"--version={runtime_version}"]
    if spot:
      args.append("--spot")
    return (f"{self._gcloud('describe', '--format=value(state)')} >/dev/null 2>&1 || "
            f"{self._gcloud('create', *args)}")

  def delete(self) -> str:
    return self._gcloud("delete", "--quiet")

  def sync(self, how: str, wheel: str = "") -> list[str]:
    if how == "none":
      return []
    if how == "wheel":
      if not wheel:
        raise common.UsageError("--sync=wheel needs --wheel (python -m build --wheel)")
      name = wheel.rsplit("/", 1)[-1]
      return [self.scp_all(wheel, f"~/{name}"),
              self.ssh_all(f"python3 -m pip install --user '{name}[tpu]'")]
    archive = "/tmp/mplug2_jax.tar.gz"
    return [f"git archive --format=tar.gz -o {archive} HEAD",
            self.scp_all(archive, "~/mplug2_jax.tar.gz"),
            self.ssh_all(f"mkdir -p {REMOTE_DIR} && tar xzf ~/mplug2_jax.tar.gz -C {REMOTE_DIR} "
                         f"&& cd {REMOTE_DIR} && python3 -m pip install --user -e '.[tpu]' "
                         "-c constraints.txt")]

  def clear(self) -> str:
    return self.ssh_all("sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | "
                        "xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; true")

  def start(self, command: Sequence[str]) -> str:
    run = common.quote(command)
    return self.ssh_all(f"mkdir -p {LOG_DIR} && cd {REMOTE_DIR} && {REMOTE_ENV} && "
                        f"nohup {run} > {LOG_DIR}/$(hostname).log 2>&1 < /dev/null &")


def workdir_of(command: Sequence[str]) -> str:
  for i, arg in enumerate(command):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(command):
      return command[i + 1]
  return ""


def plan(pod: Pod, command: Sequence[str], *, accelerator_type: str, runtime_version: str,
         spot: bool, sync: str, wheel: str = "") -> list[str]:
  if not command:
    raise common.UsageError("no command after `--` (e.g. -- python -m mplug2_jax.main ...)")
  return ([pod.create(accelerator_type, runtime_version, spot)] + pod.sync(sync, wheel)
          + [pod.clear(), pod.start(command)])


def status_of(workdir: str) -> str:
  from etils import epath

  path = epath.Path(workdir) / "run_status.json"
  try:
    return json.loads(path.read_text()).get("status", "") if path.exists() else ""
  except (OSError, ValueError):
    return ""


def main(argv: Sequence[str] | None = None) -> int:
  from absl import flags

  from mplug2_jax import cli

  argv, command = common.split_command(argv)
  fv = flags.FlagValues()
  flags.DEFINE_string("tpu", None, "TPU VM name", flag_values=fv)
  flags.DEFINE_string("zone", None, "zone, e.g. us-east5-a", flag_values=fv)
  flags.DEFINE_string("project", "", "GCP project (default: gcloud's)", flag_values=fv)
  flags.DEFINE_string("accelerator_type", "v5p-32", "slice type", flag_values=fv)
  flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5", "TPU VM software version",
                      flag_values=fv)
  flags.DEFINE_bool("spot", False, "Spot capacity (preemptible)", flag_values=fv)
  flags.DEFINE_enum("sync", "code", ("code", "wheel", "none"), "how the code gets to the "
                    "workers", flag_values=fv)
  flags.DEFINE_string("wheel", "", "wheel file for --sync=wheel", flag_values=fv)
  flags.DEFINE_bool("restart_on_preemption", False, "recreate and restart a preempted slice",
                    flag_values=fv)
  flags.DEFINE_integer("poll_s", 300, "seconds between state polls", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the commands only", flag_values=fv)
  flags.mark_flags_as_required(["tpu", "zone"], flag_values=fv)
  cli.parse(fv, argv, __doc__)
  try:
    workers = num_workers(fv.accelerator_type)
    pod = Pod(fv.tpu, fv.zone, fv.project)
    steps = plan(pod, command, accelerator_type=fv.accelerator_type,
                 runtime_version=fv.runtime_version, spot=fv.spot, sync=fv.sync, wheel=fv.wheel)
    workdir = workdir_of(command)
    if fv.restart_on_preemption and not workdir.startswith("gs://"):
      raise common.UsageError("--restart_on_preemption needs the command's --workdir on "
                              f"gs:// (got {workdir!r}): a recreated slice has empty disks")
  except common.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"# {fv.tpu}: {fv.accelerator_type}, {workers} worker(s); logs in {LOG_DIR}/"
        "<worker>.log on each", flush=True)
  if fv.restart_on_preemption and not fv.dry_run:  # a stale status must not end the loop
    from etils import epath

    (epath.Path(workdir) / "run_status.json").unlink(missing_ok=True)
  rc = common.run_steps(steps, fv.dry_run)
  if rc or not fv.restart_on_preemption:
    return rc
  print(f"# every {fv.poll_s}s: {pod.describe_state()}; read {workdir}/run_status.json; "
        f"PREEMPTED/TERMINATED -> {pod.delete()} and the steps above again; done -> stop",
        flush=True)
  if fv.dry_run:
    return 0
  from etils import epath

  while True:
    time.sleep(fv.poll_s)
    status = status_of(workdir)
    if status in ("done", "stopped"):
      print(f"run {status}", flush=True)
      return 0
    state = subprocess.run(["bash", "-c", pod.describe_state()], capture_output=True,
                           text=True).stdout.strip()
    again = []
    if state in ("PREEMPTED", "TERMINATED"):
      print(f"slice {state}: recreating", flush=True)
      common.run_steps([pod.delete()], dry_run=False, check=False)
      again = steps
    elif status == "preempted":
      print("run preempted on a live slice: restarting", flush=True)
      again = steps[-2:]
    if again:
      (epath.Path(workdir) / "run_status.json").unlink(missing_ok=True)
      rc = common.run_steps(again, dry_run=False)
      if rc:
        return rc


if __name__ == "__main__":
  sys.exit(main())
