"""The train loop through `python -m mplug2_jax.main`: metrics files, exact resume after a
SIGTERM (preemption) save, 2-process training; plus host-side helpers.

The runs are subprocesses on one CPU device (two for the multi-process comparison) sharing
a persistent compilation cache, so only the first run pays the compile. The model is the
demo config shrunk further by flags, on synthetic batches.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import jax

from mplug2_jax import experiment, param_store, sharding
from mplug2_jax.data import synthetic
from mplug2_jax.models.mplug2 import flops
from mplug2_jax.train import metrics as metrics_lib
from mplug2_jax.train import state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
SMALL = [
    "--config.model.vision.layers=1", "--config.model.text.encoder_layers=2",
    "--config.model.text.fusion_layers=1", "--config.model.text.fusion_layers_built=1",
    "--config.model.text.decoder_layers=1", "--config.model.num_frames=1",
    "--config.model.text.vocab_size=512", "--config.batch_size=4",
    "--config.objective.queue_size=8", "--config.data.max_text_len=8",
    "--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
]
LOSSES = ("loss", "loss/itc", "loss/itm", "loss/mlm", "loss/lm", "grad_norm", "lr")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  # MPLUG2_TEST_JAX_CACHE keeps the compiled programs between sessions (development).
  return os.environ.get("MPLUG2_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax_cache"))


def command(workdir, *extra, steps=STEPS):
  return [sys.executable, "-m", "mplug2_jax.main",
          f"--config=configs/demo.py:synthetic=1,steps={steps}", f"--workdir={workdir}",
          *SMALL, *extra]


def environment(cache, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_DEFAULT_PRNG_IMPL", None)
  return env


def run(cache, workdir, *extra, devices=1, timeout=900):
  proc = subprocess.run(command(workdir, *extra), cwd=REPO, env=environment(cache, devices),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def losses(workdir):
  return {r["step"]: {k: r[k] for k in LOSSES if k in r} for r in metrics_lib.read_metrics(workdir)}


def assert_same_losses(a, b, rtol=0.0):
  assert sorted(a) == sorted(b)
  for step in a:
    assert a[step].keys() == b[step].keys(), step
    for k in a[step]:
      if rtol:
        np.testing.assert_allclose(a[step][k], b[step][k], rtol=rtol, err_msg=f"{step} {k}")
      else:
        assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = run(cache, workdir)
  return workdir, proc


# --------------------------------------------------------------------------------------
# Through main.
# --------------------------------------------------------------------------------------


def test_main_writes_metrics_plot_events_and_checkpoints(straight):
  workdir, proc = straight
  rows = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for r in rows:
    assert {"loss/itc", "loss/itm", "loss/mlm", "loss/lm", "lr", "grad_norm",
            "perf/samples_per_sec", "perf/tflops_per_sec", "perf/mfu", "perf/eta_sec",
            "nonfinite_total"} <= set(r)
    assert np.isfinite(r["loss"])
  assert os.path.getsize(os.path.join(workdir, "loss_curves.png")) > 1000
  assert any(f.startswith("events.") for f in os.listdir(os.path.join(workdir, "tb")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert f"step {STEPS}/{STEPS} | loss" in proc.stdout
  assert "ETA" in proc.stdout and "TFLOP/s" in proc.stdout
  assert "memory analysis" in proc.stderr
  assert f"done at step {STEPS}" in proc.stdout


def test_finished_run_exports_its_final_params(straight):
  """params/ + model_config.json in the workdir: what `--checkpoint` and init_checkpoint
  read; equal to the last checkpoint's parameters."""
  import orbax.checkpoint as ocp

  workdir = straight[0]
  exported = param_store.load_params(workdir)
  assert param_store.load_model_config(workdir).task == "pretrain"
  with ocp.StandardCheckpointer() as c:
    saved = c.restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))["params"]
  flat_a, flat_b = param_store.flatten(exported), param_store.flatten(saved)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], np.asarray(flat_b[k]), err_msg=k)


@pytest.mark.slow  # covered faster: test_launch (SIGTERM, one step saved, exact resume),
# test_train_core::test_sigterm_requests_a_save and test_exact_resume_bit_for_bit
def test_sigterm_saves_and_the_resumed_run_matches_the_straight_run(straight, cache,
                                                                   tmp_path):
  want = losses(straight[0])
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(command(workdir), cwd=REPO, env=environment(cache),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # config.json is written once the SIGTERM handler is installed (start of the loop).
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(workdir, "config.json")):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  assert "preempted at step 1" in out, out + err[-3000:]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert not os.path.exists(os.path.join(workdir, "loss_curves.png"))
  assert not os.path.exists(os.path.join(workdir, "params"))  # only a finished run exports

  proc = run(cache, workdir)
  assert "resumed from" in proc.stderr and "at step 1" in proc.stderr
  assert f"done at step {STEPS}" in proc.stdout
  assert_same_losses(want, losses(workdir))  # bit for bit


@pytest.mark.slow
def test_init_checkpoint_loads_converted_params(straight, cache, tmp_path):
  """config.init_checkpoint: an orbax params dir as `mplug2_jax.convert` writes it (here the
  straight run's workdir, which exports its final parameters) initialises a fresh run."""
  init = straight[0]
  workdir = str(tmp_path / "from_init")
  proc = run(cache, workdir, f"--config.init_checkpoint={init}", "--config.total_steps=1")
  assert "parameters loaded, 0 kept from init" in proc.stderr, proc.stderr[-3000:]
  assert f"initialised from {init}" in proc.stderr
  scratch, loaded = losses(straight[0])[1], losses(workdir)[1]
  assert loaded["loss/itc"] != scratch["loss/itc"]


@pytest.mark.slow
def test_stop_and_resume_midway_matches(straight, cache, tmp_path):
  workdir = str(tmp_path / "stopped")
  proc = run(cache, workdir, "--stop_after=3")
  assert "stopped at step 3" in proc.stdout
  run(cache, workdir)
  assert_same_losses(losses(straight[0]), losses(workdir))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(cache, tmp_path):
  """2 local processes x 1 CPU device (jax.distributed on 127.0.0.1) vs 1 process x 2
  devices: same mesh, same global batch, same losses (up to collective summation order)."""
  steps = ["--config.total_steps=3"]
  one = str(tmp_path / "one")
  run(cache, one, *steps, devices=2)
  two = str(tmp_path / "two")
  port = _free_port()
  procs = [subprocess.Popen(
      command(two, *steps, "--coordinator_address", f"127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=environment(cache, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=1800) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert "process 0/2" in outs[0][1] or "process 0 of 2" in outs[0][1]
  assert_same_losses(losses(one), losses(two), rtol=1e-5)


# --------------------------------------------------------------------------------------
# Preemption of a 2-process run (the local launcher, jax.distributed on 127.0.0.1).
# --------------------------------------------------------------------------------------

TWO_STEPS = 16


def launch_two(cache, workdir, logs):
  """`python -m mplug2_jax.launch.local --num_processes=2 -- python -m mplug2_jax.main ...`
  (one CPU device each, logs in `logs/process_<i>.log`); returns (launcher, [pid0, pid1])."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "mplug2_jax.launch.local", "--num_processes=2",
       f"--log_dir={logs}", "--",
       *command(workdir, "--config.checkpoint.every_steps=4", steps=TWO_STEPS)],
      cwd=REPO, env=environment(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  return proc, [int(proc.stdout.readline().split()[-1]) for _ in range(2)]


def tails(logs):
  return "\n".join(f"--- process {i}:\n" + (logs / f"process_{i}.log").read_text()[-3000:]
                   for i in range(2) if (logs / f"process_{i}.log").exists())


def finish(proc, logs, timeout=600):
  """Waits for the launcher (stopping it on a hang); returns both processes' logs."""
  try:
    _, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.terminate()  # the launcher forwards it to both processes
    proc.communicate(timeout=120)
    raise AssertionError("the 2-process run hung\n" + tails(logs)) from None
  assert proc.returncode == 0, err[-2000:] + tails(logs)
  return [(logs / f"process_{i}.log").read_text() for i in range(2)]


def stop_steps(text):
  return [int(s) for s in re.findall(r"preemption notice at step (\d+): saving", text)]


# 12 min on 2 cores at load ~9 (three 2-process launches; process 1 compiles the step in
# each, as on CPU only process 0 gets persistent-cache hits).
# Faster coverage: tests/test_launch.py (2 processes, the same guard and checkpoints in a
# small loop) and test_train_core.py::test_only_the_guard_moves_the_preemption_sync_counter.
@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_and_resumes_exactly(cache, tmp_path):
  """SIGTERM (a preemption notice) to process 1 of a 2-process run, mid-training, with
  asynchronous interval saves: both processes stop at the same step (JAX's preemption sync
  point), save that one checkpoint and exit with status preempted; the rerun resumes from
  it and ends with the parameters and losses of an uninterrupted 2-process run, bit for
  bit."""
  straight = tmp_path / "straight"
  proc, _ = launch_two(cache, straight, tmp_path / "straight_logs")
  finish(proc, tmp_path / "straight_logs")
  assert json.loads((straight / "run_status.json").read_text())["status"] == "done"

  work, logs = tmp_path / "preempted", tmp_path / "preempted_logs"
  proc, pids = launch_two(cache, work, logs)
  deadline = time.time() + 300
  # Process 0 logs a step once both processes have run it (its collectives need both); by
  # step 5 the asynchronous save of step 4 has finished.
  while not any(r["step"] >= 5 for r in metrics_lib.read_metrics(work)):
    if proc.poll() is not None or time.time() > deadline:
      finish(proc, logs, timeout=1)
      raise AssertionError("no training step before the deadline\n" + tails(logs))
    time.sleep(0.05)
  os.kill(pids[1], signal.SIGTERM)
  text = finish(proc, logs)
  status = json.loads((work / "run_status.json").read_text())
  assert status["status"] == "preempted", status
  stop = status["step"]
  assert stop_steps(text[0]) == stop_steps(text[1]) == [stop] and 5 <= stop < TWO_STEPS
  saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [4, stop], saved  # the interval save of step 4, then the agreed step
  assert not (work / "params").exists()

  proc, _ = launch_two(cache, work, logs)
  for t in finish(proc, logs):
    assert re.search(rf"resumed from \S+ at step {stop}\b", t), t[-3000:]
  assert json.loads((work / "run_status.json").read_text())["status"] == "done"
  assert_same_losses(losses(straight), losses(work))  # bit for bit
  want, got = (param_store.flatten(param_store.load_params(w)) for w in (straight, work))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------------------------------
# Host-side helpers (no compilation).
# --------------------------------------------------------------------------------------


def test_progress_line_and_writer_truncate_on_resume(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    w.write(step, {"loss": 1.0 / step, "loss/itc": 0.5, "lr": 1e-3, "grad_norm": 2.0})
  w.close()
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=3)
  w.close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert metrics_lib.plot_losses(str(tmp_path)).endswith("loss_curves.png")
  line = metrics_lib.progress_line(3, 10, {"loss": 1.5, "loss/itc": 0.5, "lr": 1e-3,
                                    "grad_norm": 2.0, "perf/samples_per_sec": 12.0,
                                    "perf/tflops_per_sec": 0.01, "perf/mfu": 0.1,
                                    "perf/eta_sec": 75, "nonfinite_total": 1.0})
  assert line == ("step 3/10 | loss 1.5000 (itc 0.500) | lr 1.00e-03 | gnorm 2.000 | "
                  "12.0 samples/s | 0.010 TFLOP/s MFU 10.0% | skipped 1 non-finite | "
                  "ETA 1m15s")


# --------------------------------------------------------------------------------------
# Analytic FLOPs against XLA's cost analysis.
# --------------------------------------------------------------------------------------


def flops_config(task):
  """A small model whose matmuls dominate, every scanned stack of length 1: XLA's cost
  analysis counts a while-loop (scan) body once, whatever its trip count."""
  c = experiment.base_config("tiny", task)
  m = c.model
  m.num_classes = 10 if task == "classification" else 0
  m.vision.width = m.text.hidden_size = 256
  m.text.intermediate_size, m.text.num_heads, m.text.vocab_size = 1024, 4, 1000
  m.num_frames = 2
  m.vision.layers, m.text.encoder_layers, m.text.fusion_layers = 1, 3, 1
  m.text.decoder_layers = 1
  c.mesh.shape, c.batch_size, c.total_steps = (1, 1, 1), 4, 10
  c.data.update(max_text_len=8, max_question_len=8, max_answer_len=8, max_caption_len=8)
  c.objective.queue_size = 8
  return c


def xla_and_analytic_flops(task, compile_=False):
  c = flops_config(task)
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  batch = synthetic.SyntheticIterator(c, sharding.batch_sharding(mesh, c)).global_batch(0)
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  setup = state_lib.TrainSetup(c, mesh, abstract)
  lowered = step_lib.JittedStep(setup).lower(setup.abstract_sharded_state(), abstract)
  cost = lowered.compile().cost_analysis() if compile_ else lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"], flops.train_step_flops(c, {k: v.shape for k, v in batch.items()})


@pytest.mark.parametrize("task", ["pretrain", "videoqa", "classification"])
def test_analytic_flops_match_xla_cost_analysis(task):
  xla, analytic = xla_and_analytic_flops(task)
  assert abs(analytic / xla - 1) < 0.2, (task, analytic, xla)


@pytest.mark.slow
def test_analytic_flops_match_the_compiled_cost_analysis():
  xla, analytic = xla_and_analytic_flops("caption", compile_=True)
  assert abs(analytic / xla - 1) < 0.2, (analytic, xla)
