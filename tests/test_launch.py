"""`python -m mplug2_jax.launch.local` and preemption across processes: SIGTERM to one of
two processes makes both save the same step (JAX's preemption sync point), and the resumed
run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mplug2_jax.launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "preemption_worker.py")
TOTAL = 120


def environment():
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("JAX_DEFAULT_PRNG_IMPL", None)
  return env


def launch(workdir, total=TOTAL, processes=2):
  return subprocess.Popen(
      [sys.executable, "-m", "mplug2_jax.launch.local", f"--num_processes={processes}",
       "--", sys.executable, WORKER, str(workdir), str(total)],
      cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def statuses(workdir, processes=2):
  return [json.loads((workdir / f"status_{i}.json").read_text()) for i in range(processes)]


def test_dry_run_prints_every_process():
  out = subprocess.run(
      [sys.executable, "-m", "mplug2_jax.launch.local", "--num_processes=3", "--port=5555",
       "--devices_per_process=2", "--dry_run", "--", "python", "-m", "mplug2_jax.main",
       "--workdir=/tmp/w"], cwd=REPO, env=environment(), capture_output=True, text=True,
      timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert (f"JAX_COORDINATOR_ADDRESS=127.0.0.1:5555 JAX_NUM_PROCESSES=3 JAX_PLATFORMS=cpu "
            f"JAX_PROCESS_ID={i} MPLUG2_NUM_HOSTS=1 XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m "
            "mplug2_jax.main --workdir=/tmp/w") == line
  env = local.process_env(1, 2, 7, 4, base={"XLA_FLAGS": "--xla_a=1 "
                                            "--xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--xla_a=1 --xla_force_host_platform_device_count=4"


def test_a_failing_process_stops_the_others(tmp_path):
  code = ("import sys, time, os\n"
          "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)")
  start = time.time()
  procs = local.start(2, [sys.executable, "-c", code])
  assert local.wait(procs, grace_s=5) == 3
  assert time.time() - start < 30 and procs[0].returncode != 0


def test_sigterm_to_one_process_saves_one_step_on_both_and_resumes_exactly(tmp_path):
  straight = tmp_path / "straight"
  proc = launch(straight)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  want = statuses(straight)
  assert [s["status"] for s in want] == ["done", "done"] and want[0]["synchronised"]

  work = tmp_path / "preempted"
  proc = launch(work)
  pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
  deadline = time.time() + 300
  while True:  # both processes are in the loop (the guard is up) and have run a few steps
    steps = [int((work / f"progress_{i}").read_text() or 0)
             if (work / f"progress_{i}").exists() else 0 for i in range(2)]
    if min(steps) >= 5:
      break
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  os.kill(pids[1], signal.SIGTERM)  # one host is preempted
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  got = statuses(work)
  assert [s["status"] for s in got] == ["preempted", "preempted"], got
  assert got[0]["step"] == got[1]["step"] < TOTAL
  saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [got[0]["step"]]

  proc = launch(work)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  resumed = statuses(work)
  for r, w in zip(resumed, want):
    assert r["status"] == "done" and r["start"] == got[0]["step"]
    assert r["state_step"] == TOTAL
    assert r["x"] == w["x"]  # bit for bit
  print("preempted at", got[0]["step"], "of", TOTAL)
