r"""Fault injection into a tiny training run: each fault either leaves a run whose final
parameters equal an uninterrupted run bit for bit, or stops the run with one clear line.

  python -m mplug2_jax.train.faults [--workdir DIR] [--only NAME,...]

Each case runs `python -m mplug2_jax.main` (the demo config on synthetic batches, shrunk
to a few steps on one CPU device; one persistent compilation cache) as a subprocess and
injects one fault:

  sigterm          SIGTERM at the start of the loop: checkpoint, exit 0; the resumed run
                   equals the straight run
  kill9_in_save    SIGKILL while a checkpoint is being written (its temporary directory
                   exists): the resumed run restarts from the last complete one, equal
  flipped_bytes    64 bytes flipped in the latest checkpoint's array data: the restore
                   warns, sets it aside, resumes from the previous one, equal
  full_disk        file writes capped (RLIMIT_FSIZE) when the second checkpoint is due:
                   exit 1, the last stderr line names the step and directory, no
                   traceback, the earlier checkpoint restores and the rerun is equal
  torn_metrics     a torn last line appended to metrics.jsonl: the resume drops it, equal
  diverging        lr=1e30 makes every step non-finite: the guard skips them, the run stops
                   with one line naming the batch step, no params/ exported

Prints a table (fault -> outcome) and exits 1 if any case fails. Slow (minutes: a compile
and about a dozen short runs); the fast checks of the same promises are in
tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

STEPS = 6
SMALL = [
    "--config.model.vision.layers=1", "--config.model.text.encoder_layers=2",
    "--config.model.text.fusion_layers=1", "--config.model.text.fusion_layers_built=1",
    "--config.model.text.decoder_layers=1", "--config.model.num_frames=1",
    "--config.model.text.vocab_size=512", "--config.batch_size=4",
    "--config.objective.queue_size=8", "--config.data.max_text_len=8",
    "--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=3",
]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CaseFailed(AssertionError):
  pass


def expect(ok: bool, what: str) -> None:
  if not ok:
    raise CaseFailed(what)


class Runner:
  """Runs `mplug2_jax.main` on the tiny config in fresh workdirs under `root`."""

  def __init__(self, root: str):
    self.root = root
    self.cache = os.path.join(root, "jax_cache")
    self.env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=self.cache,
                    XLA_FLAGS="--xla_force_host_platform_device_count=1",
                    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def workdir(self, name: str) -> str:
    path = os.path.join(self.root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path

  def command(self, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mplug2_jax.main",
            f"--config=configs/demo.py:synthetic=1,steps={STEPS}", f"--workdir={workdir}",
            *SMALL, *extra]

  def start(self, workdir: str, *extra: str, file_limit_kib: int = 0):
    """`file_limit_kib`: cap every file the run writes (`ulimit -f`, SIGXFSZ ignored, so a
    write past it fails with EFBIG as on a full disk)."""
    cmd = self.command(workdir, *extra)
    if file_limit_kib:  # a shell sets the limit: no fork of this (threaded) process
      cmd = ["bash", "-c", f"trap '' XFSZ; ulimit -f {file_limit_kib}; exec \"$@\"", "bash",
             *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  def run(self, workdir: str, *extra: str, file_limit_kib: int = 0,
          want_rc: int | None = 0) -> tuple[int, str, str]:
    proc = self.start(workdir, *extra, file_limit_kib=file_limit_kib)
    out, err = proc.communicate(timeout=1800)
    if want_rc is not None:
      expect(proc.returncode == want_rc, f"exit status {proc.returncode}, expected {want_rc}:"
             f" {err.strip().splitlines()[-1] if err.strip() else out[-300:]}")
    return proc.returncode, out, err


def final_params(workdir: str) -> dict[str, np.ndarray]:
  from mplug2_jax import param_store

  return param_store.flatten(param_store.load_params(workdir))


def same_params(a: str, b: str) -> str:
  pa, pb = final_params(a), final_params(b)
  expect(pa.keys() == pb.keys(), "the parameter trees differ")
  differ = [k for k in pa if not np.array_equal(pa[k], pb[k])]
  expect(not differ, f"{len(differ)} of {len(pa)} parameters differ, e.g. {differ[:2]}")
  return f"final parameters equal the straight run bit for bit ({len(pa)} arrays)"


def wait_for(predicate: Callable[[], bool], proc, seconds: float = 900, poll: float = 0.01):
  deadline = time.time() + seconds
  while not predicate():
    if proc.poll() is not None:
      raise CaseFailed(f"the run ended (status {proc.returncode}) before the fault: "
                       + proc.communicate()[1][-500:])
    expect(time.time() < deadline, "timed out waiting for the moment to inject the fault")
    time.sleep(poll)


def flip_bytes(step_dir: str, n: int = 64) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)
  return target


def no_traceback(err: str) -> None:
  if "Traceback" in err:
    raise CaseFailed("a traceback in stderr: "
                     + err[err.index("Traceback"):][:300].replace("\n", " | "))


# --------------------------------------------------------------------------------------
# The cases: each returns its outcome line or raises CaseFailed.
# --------------------------------------------------------------------------------------


def case_sigterm(r: Runner, straight: str) -> str:
  workdir = r.workdir("sigterm")
  proc = r.start(workdir)
  wait_for(lambda: os.path.exists(os.path.join(workdir, "config.json")), proc, poll=0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=1800)
  expect(proc.returncode == 0 and "preempted at step" in out,
         f"status {proc.returncode}: {out[-200:]} {err[-300:]}")
  r.run(workdir)
  return "preempted with a checkpoint, exit 0; " + same_params(straight, workdir)


def case_kill9_in_save(r: Runner, straight: str) -> str:
  workdir = r.workdir("kill9")
  ckpts = os.path.join(workdir, "checkpoints")

  def saving():
    return os.path.isdir(ckpts) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))

  proc = r.start(workdir)
  try:
    # A save after the first complete checkpoint, so that the resume has one to start from.
    wait_for(lambda: os.path.isdir(ckpts) and ("2" in os.listdir(ckpts) and saving()
                                               or "4" in os.listdir(ckpts)), proc)
  finally:
    proc.kill()
    proc.communicate()
  during = saving()
  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  r.run(workdir)
  where = "during a save" if during else "right after a save (the save was too quick to hit)"
  return (f"killed {where}, complete checkpoints {steps}; resumed; "
          + same_params(straight, workdir))


def case_flipped_bytes(r: Runner, straight: str) -> str:
  workdir = r.workdir("flipped")
  r.run(workdir, "--stop_after=4")
  ckpts = os.path.join(workdir, "checkpoints")
  expect(sorted(os.listdir(ckpts)) == ["2", "4"], f"checkpoints {os.listdir(ckpts)}")
  flip_bytes(os.path.join(ckpts, "4"))
  _, out, err = r.run(workdir)
  expect("RESUMING FROM STEP 2, not 4" in err, "no loud fallback warning")
  expect(os.path.isdir(ckpts + ".unusable"), "the damaged checkpoint was not set aside")
  return "warned, set step 4 aside, resumed from 2; " + same_params(straight, workdir)


def case_flipped_bytes_fail(r: Runner, straight: str) -> str:
  workdir = r.workdir("flipped_fail")
  r.run(workdir, "--stop_after=4")
  flip_bytes(os.path.join(workdir, "checkpoints", "4"))
  _, _, err = r.run(workdir, "--config.checkpoint.on_corrupt=fail", want_rc=1)
  last = err.strip().splitlines()[-1]
  expect(last.startswith("error: checkpoint ") and "/checkpoints/4 is unusable" in last, last)
  no_traceback(err)
  return f"on_corrupt=fail: exit 1, {last[:110]}..."


def case_full_disk(r: Runner, straight: str) -> str:
  workdir = r.workdir("full_disk")
  r.run(workdir, "--stop_after=2")
  _, out, err = r.run(workdir, file_limit_kib=512, want_rc=1)
  last = err.strip().splitlines()[-1]
  expect(last.startswith("error: checkpoint of step 4 could not be written to "), last)
  expect("the checkpoint of step 2 is intact" in last, last)
  logged = [int(line.split("/")[0].split()[-1]) for line in out.splitlines()
            if line.startswith("step ") and "/" in line]
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  expect(steps == [2], f"checkpoints {steps}")
  r.run(workdir)
  outcome = (f"exit 1 at step {max(logged or [0])} (save of 4 failed), last line: "
             f"{last[7:90]}...; rerun: " + same_params(straight, workdir))
  expect("Traceback" not in err, f"{err.count('Traceback')} tracebacks in stderr before the "
         f"line (first: {err[err.find('Traceback'):][:160]!r}); otherwise {outcome}")
  return outcome


def case_torn_metrics(r: Runner, straight: str) -> str:
  workdir = r.workdir("torn")
  r.run(workdir, "--stop_after=2")
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 3, "loss": 1.2')
  r.run(workdir)
  from mplug2_jax.train import metrics as metrics_lib
  steps = [row["step"] for row in metrics_lib.read_metrics(workdir)]
  expect(steps == list(range(1, STEPS + 1)), f"metrics steps {steps}")
  return "torn line dropped on resume; " + same_params(straight, workdir)


def case_diverging(r: Runner, straight: str) -> str:
  workdir = r.workdir("diverging")
  _, _, err = r.run(workdir, "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
                    "--config.max_nonfinite_steps=2", want_rc=1)
  last = err.strip().splitlines()[-1]
  expect("consecutive" in last and "step" in last, last)
  no_traceback(err)
  expect(not os.path.exists(os.path.join(workdir, "params")), "params/ was exported")
  return f"exit 1: {last[7:120]}...; no params/ exported"


CASES = {"sigterm": case_sigterm, "kill9_in_save": case_kill9_in_save,
         "flipped_bytes": case_flipped_bytes, "flipped_bytes_fail": case_flipped_bytes_fail,
         "full_disk": case_full_disk, "torn_metrics": case_torn_metrics,
         "diverging": case_diverging}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="", help="where the runs go (default: a temp dir)")
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--reuse_straight", action="store_true",
                      help="keep a finished straight run already in --workdir")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(CASES)
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
  root = args.workdir or tempfile.mkdtemp(prefix="mplug2_faults_")
  os.makedirs(root, exist_ok=True)
  r = Runner(os.path.abspath(root))
  t0 = time.time()
  straight = os.path.join(r.root, "straight")
  if not (args.reuse_straight and os.path.isdir(os.path.join(straight, "params"))):
    r.run(r.workdir("straight"))
  print(f"straight run: {STEPS} steps in {time.time() - t0:.0f}s ({root})", flush=True)
  rows = []
  for name in names:
    t = time.time()
    try:
      outcome, ok = CASES[name](r, straight), True
    except Exception as e:  # noqa: BLE001  (a case that breaks is a failed case)
      outcome, ok = f"FAILED: {e}", False
    rows.append((name, ok, outcome))
    print(f"{name:20s} {'ok  ' if ok else 'FAIL'} {time.time() - t:5.0f}s  {outcome}",
          flush=True)
  print("\n| fault | result | outcome |\n|---|---|---|")
  for name, ok, outcome in rows:
    print(f"| {name} | {'ok' if ok else 'FAILED'} | {outcome} |")
  return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
