"""The benchmark tools: the CLI runs the real train step on the tiny config, the step
compiles once per shape, and the plan tool's HLO collective accounting."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mplug2_jax import experiment, sharding
from mplug2_jax.benchmark import common, roofline
from mplug2_jax.train import state as state_lib
from mplug2_jax.train import step as step_lib
from conftest import REPO


def test_benchmark_cli_runs_the_tiny_train_step(tmp_path):
  """Data-parallel over 2 host devices, batches from the real Grain pipeline (1 worker)."""
  data = tmp_path / "demo"
  subprocess.run([sys.executable, "-m", "mplug2_jax.data.demo", f"--out={data}", "--train=4",
                  "--test=2", "--size=32", "--frames=4"], check=True, capture_output=True,
                 timeout=300, cwd=REPO)
  result = subprocess.run(
      [sys.executable, "-m", "mplug2_jax.benchmark", f"--config={REPO}/configs/caption.py:tiny",
       "--config.model.vision.layers=1", "--config.model.text.decoder_layers=1",
       "--frames=1", "--steps=2", "--warmup=0", f"--profile={tmp_path}", "--host_devices=2",
       f"--data={data}/video_caption", "--loader_workers=1"],
      capture_output=True, text=True,
      timeout=600, cwd=REPO,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})  # one real CPU device
  assert result.returncode == 0, result.stderr[-2000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} on 2 cpu device(s)" in result.stdout
  assert "1 Grain worker(s)" in result.stdout
  for field in ("train step (median)", "samples/s", "XLA cost analysis", "MFU",
                "before / after the steps", "beam-search captioning", "top operations"):
    assert field in result.stdout, result.stdout
  # The profile names the compiled step's operations; its HLO is kept beside the trace.
  hlo = (tmp_path / "train_step.hlo.txt").read_text()
  top = result.stdout.split("top operations")[1].splitlines()[1].split()[3]
  assert f"%{top} = " in hlo, (top, result.stdout)


def test_train_step_compiles_once_per_shape():
  config = experiment.base_config("tiny", "caption")
  config.model.num_frames = 1
  config.total_steps = 10
  config.mesh.shape = (1, 1, 1)
  config.batch_size = 2
  common.set_text_lengths(config, 6)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  batch = common.synthetic_batch(config)
  setup = state_lib.TrainSetup(config, mesh, batch)
  state = setup.init()
  step = step_lib.JittedStep(setup)
  losses = []
  for i in range(3):
    state, metrics = step(state, common.synthetic_batch(config, seed=i))
    losses.append(float(metrics["loss"]))
  assert step._fn._cache_size() == 1
  assert np.all(np.isfinite(losses))


def test_collective_bytes_parse_hlo_results():
  hlo = """
  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), dimensions={0}
  %ar-start = (f32[256]{0}, f32[16,16]{1,0}) all-reduce-start(f32[256]{0} %a, f32[16,16]{1,0} %b)
  %rs = f32[4,4]{1,0} reduce-scatter(f32[16,4]{1,0} %c), dimensions={0}
  %add = f32[4]{0} add(f32[4]{0} %x, f32[4]{0} %y)
  """
  got = roofline.collective_bytes(hlo)
  assert got["all-gather"] == 8 * 1024 * 2
  assert got["all-reduce"] == (256 + 256) * 4
  assert got["reduce-scatter"] == 16 * 4
  assert got["all-to-all"] == 0


def test_roofline_prediction_by_hand():
  """The roofline arithmetic on round numbers (H100: 989 TFLOP/s x 0.75, 3.35 TB/s, 450 GB/s)."""
  raw = dict(model_flops=742e12 * 0.1, remat="full", argument_bytes=2**30,
             temp_bytes=2**30, collective_bytes={"all-gather": 9e9, "all-reduce": 0.0})
  p = roofline.predict(raw, "H100 SXM (8-GPU NVLink node)", overlap=0.8)
  executed = 74.2e12 * 4 / 3
  assert p["t_compute"] == pytest.approx(executed / (989e12 * 0.75))
  assert p["t_memory"] == pytest.approx(3 * 2**30 / 3.35e12)
  assert p["t_comm"] == pytest.approx(9e9 / 450e9)
  assert p["step"] == pytest.approx(p["t_compute"] + 0.2 * 0.02)
  assert p["mfu"] == pytest.approx(74.2e12 / (p["step"] * 989e12))
  assert p["fits"] and p["memory_gib"] == pytest.approx(2.0)
  # Without recomputation the same step is 3/4 of the compute time.
  q = roofline.predict(dict(raw, remat="dots_saveable"), "H100 SXM (8-GPU NVLink node)")
  assert q["t_compute"] == pytest.approx(p["t_compute"] * 0.75)


def test_matmul_forms_cli_times_every_operand_order():
  result = subprocess.run(
      [sys.executable, "-m", "mplug2_jax.benchmark.matmul_forms", "--tokens=64", "--width=32",
       "--hidden=48", "--repeats=1"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [l for l in result.stdout.splitlines() if "GFLOP/s" in l]
  assert len(lines) == 4, result.stdout
  assert all(float(l.split()[-2]) > 0 for l in lines), result.stdout


def test_accelerator_check_cpu_smoke(tmp_path):
  """The prepared accelerator check runs end to end on the CPU (tiny config), so the
  script a GPU window relies on cannot rot: both output files, every section filled."""
  import json

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(["bash", "launch/accelerator_check.sh", str(tmp_path), "--cpu_smoke"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(env, JAX_PLATFORMS="cpu", PYTHON=sys.executable))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "accelerator.json").read_text())
  assert report["ceiling_tflops"] > 0 and not report["skipped"]
  assert [r["item"] for r in report["train"]] == ["caption tiny", "Owl2 tiny"], report["train"]
  for train in report["train"]:
    assert "error" not in train, train
    assert train["step_s"] > 0 and train["samples_per_s"] > 0 and train["compiled_bytes"] > 0
  beam, decode = report["generation"]
  assert beam["videos_per_s"] > 0, beam
  assert "error" not in decode and decode["tokens_per_s"] > 0, decode
  assert "| caption tiny | 2 |" in (tmp_path / "accelerator.md").read_text()
