r"""N processes on this machine with a coordinator on loopback: multi-process runs without a
cluster (the multi-process tests, a smoke test of a launch before a pod).

  python -m mplug2_jax.launch.local --num_processes 2 [--devices_per_process 1] \
      [--platform cpu] [--port 0] [--log_dir DIR] [--dry_run] -- COMMAND ARGS...

Every process runs COMMAND with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT,
JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i and MPLUG2_NUM_HOSTS=1, which
`mplug2_jax.distributed` reads (explicit mode); on `--platform cpu` (the default) also JAX_PLATFORMS=cpu and
--xla_force_host_platform_device_count=`--devices_per_process` in XLA_FLAGS. The launcher
prints `process i: pid P` for each, forwards SIGTERM/SIGINT to all of them, waits, and exits
with the first non-zero status (after stopping the others, which would otherwise wait in a
collective), else 0. `--log_dir` writes `process_<i>.log` per process instead of sharing
this terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Sequence

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(i: int, num_processes: int, port: int, devices_per_process: int = 1,
                platform: str = "cpu", base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of process `i`."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(i), MPLUG2_NUM_HOSTS="1")
  if platform == "cpu":
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (flags + " " if flags else "") + (
        f"--xla_force_host_platform_device_count={devices_per_process}")
  return env


def start(num_processes: int, command: Sequence[str], *, port: int = 0,
          devices_per_process: int = 1, platform: str = "cpu", log_dir: str = "",
          base_env: Mapping[str, str] | None = None, **popen) -> list[subprocess.Popen]:
  """Starts the processes (does not wait)."""
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: must be >= 1")
  if not command:
    raise ValueError("no command after `--`")
  port = port or free_port()
  procs = []
  for i in range(num_processes):
    env = process_env(i, num_processes, port, devices_per_process, platform, base_env)
    kw = dict(popen)
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
      log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
      kw.update(stdout=log, stderr=subprocess.STDOUT)
    procs.append(subprocess.Popen(list(command), env=env, **kw))
  return procs


def wait(procs: list[subprocess.Popen], grace_s: float = 30.0) -> int:
  """Waits for every process; on the first failure stops the others (SIGTERM, then SIGKILL
  after `grace_s`). Returns the first non-zero status, else 0."""
  status = 0
  while [p.poll() for p in procs].count(None):  # polls every process (no short-circuit)
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed and not status:
      status = failed[0]
      for p in procs:
        if p.poll() is None:
          p.terminate()
      deadline = time.time() + grace_s
      while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: Sequence[str] | None = None) -> int:
  from absl import flags

  from mplug2_jax import cli

  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    if "--help" not in argv and "-h" not in argv:
      print("error: give the command after `--`", file=sys.stderr)
      return 2
    command = []
  else:
    cut = argv.index("--")
    argv, command = argv[:cut], argv[cut + 1:]
  fv = flags.FlagValues()
  flags.DEFINE_integer("num_processes", 2, "processes to start", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("devices_per_process", 1, "CPU devices of each process (--platform cpu)",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("platform", "cpu", ("cpu", "any"), "cpu: force JAX_PLATFORMS=cpu and the "
                    "device count; any: leave the platform to JAX", flag_values=fv)
  flags.DEFINE_integer("port", 0, "coordinator port on 127.0.0.1 (0 = a free one)",
                       flag_values=fv)
  flags.DEFINE_string("log_dir", "", "write process_<i>.log here", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the commands only", flag_values=fv)
  cli.parse(fv, argv, __doc__)
  if not command:
    print("error: give the command after `--`", file=sys.stderr)
    return 2
  port = fv.port or free_port()
  if fv.dry_run:
    for i in range(fv.num_processes):
      env = process_env(i, fv.num_processes, port, fv.devices_per_process, fv.platform, {})
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " "
            + shlex.join(command))
    return 0
  procs = start(fv.num_processes, command, port=port, devices_per_process=fv.devices_per_process,
                platform=fv.platform, log_dir=fv.log_dir)
  for i, p in enumerate(procs):
    print(f"process {i}: pid {p.pid}", flush=True)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  return wait(procs)


if __name__ == "__main__":
  sys.exit(main())
