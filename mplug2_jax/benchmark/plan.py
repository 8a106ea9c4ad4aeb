r"""Accelerator plan by AOT compilation on fake CPU meshes, plus a roofline prediction.

    python -m mplug2_jax.benchmark.plan --config configs/pretrain.py:large \
        --devices 64 --mesh "(1,64,1)" --per_device_batch 4 --remat full

Compiles (never runs) the real pretraining train step for `--devices` fake CPU devices with
the given data/fsdp/tensor mesh, bf16 compute and fp32 parameters, and reports per device:
argument bytes (parameters, optimizer state, EMA, queues), temporary bytes
(`compiled.memory_analysis()`), the analytic model FLOPs (the family's `train_step_flops`;
XLA's cost analysis counts a scanned layer stack once), and the bytes each kind of
collective moves
(parsed from the compiled HLO). `roofline.py` turns these into a predicted step time and MFU
per accelerator (its docstring has the model and its stated assumptions); `--out` saves the
raw figures so that predictions can be redone without recompiling.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/pretrain.py:large", "Config file[:arg].")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh shape (data,fsdp,tensor); default (1,devices,1).")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 4, "Videos per device.")
_FRAMES = flags.DEFINE_integer("frames", 16, "Frames per video.")
_TEXT = flags.DEFINE_integer("text_length", 30, "Text tokens.")
_SEQ = flags.DEFINE_integer("seq_length", 0, "mPLUG-Owl2: raw ids per sample "
                            "(data.max_length; 0 = the config's).")
_REMAT = flags.DEFINE_string("remat", "full", "Remat policy name (layers/stack.py).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_ATTENTION = flags.DEFINE_string(
    "attention", "chunked",
    "Attention implementation compiled (layers/attention_op.py). 'chunked' stands in for the fused "
    "kernels that do not compile for CPU (cuDNN flash attention, TPU Pallas): all three keep "
    "the (T x S) probabilities of the 4,097 visual tokens out of memory.")
_OUT = flags.DEFINE_string("out", "", "Write the raw per-device figures here (JSON), for "
                           "`python -m mplug2_jax.benchmark.roofline FILE...`.")
_DCN = flags.DEFINE_integer("dcn", 1, "TPU slices: > 1 adds the `dcn` mesh axis (size dcn, "
                            "data parallel across slices) before --mesh, which is then per "
                            "slice (default (1, devices / dcn, 1)).")
_OVERLAP = flags.DEFINE_float("overlap", 0.8, "Fraction of collective time hidden by compute.")

def main(argv):
  del argv
  devices = _DEVICES.value
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from ml_collections import config_flags  # noqa: F401

  from mplug2_jax import experiment, sharding
  from mplug2_jax.benchmark import common
  from mplug2_jax.benchmark import roofline
  from mplug2_jax.benchmark.roofline import HARDWARE, collective_bytes
  from mplug2_jax.models import registry
  from mplug2_jax.train import state as state_lib
  from mplug2_jax.train import step as step_lib

  config = experiment.load(_CONFIG.value)
  dcn = _DCN.value
  mesh_shape = eval(_MESH.value) if _MESH.value else (1, devices // dcn, 1)  # noqa: S307
  config.mesh.shape = tuple(mesh_shape)
  if dcn > 1:  # multi-slice: config_lib.effective_rules splits the batch over dcn too
    config.mesh.axes = ("dcn",) + tuple(config.mesh.axes)
    config.mesh.shape = (dcn,) + tuple(mesh_shape)
  video = "num_frames" in config.model  # mPLUG-2 (video, texts, ITC queues) vs. Owl2
  config.model.update(dtype=_DTYPE.value, remat_policy=_REMAT.value, attention=_ATTENTION.value,
                      **({"num_frames": _FRAMES.value} if video else {}))
  config.batch_size = devices * _PER_DEVICE.value // (mesh_shape[2] if len(mesh_shape) > 2 else 1)
  config.total_steps = max(config.total_steps, 1000)
  if video:
    common.set_text_lengths(config, _TEXT.value)
    config.objective.queue_size = max(config.batch_size, config.objective.queue_size //
                                      config.batch_size * config.batch_size)
  else:
    config.optimizer.accum_steps = 1  # one micro-batch per device per compiled step
    if _SEQ.value:
      config.data.max_length = _SEQ.value
  experiment.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh, config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in common.batch_spec(config).items()}
  inputs = (f"{_FRAMES.value} frames x {config.model.image_size} px" if video else
            f"{config.data.max_length} ids + {config.data.images_per_sample} image(s) x "
            f"{config.model.image_size} px")
  print(f"{config.model.task} {config.model.size}: global batch {config.batch_size} "
        f"({inputs}), mesh {dict(mesh.shape)}, "
        f"{_DTYPE.value} compute, remat {_REMAT.value}, attention {_ATTENTION.value}",
        flush=True)
  setup = state_lib.TrainSetup(config, mesh, batch)
  abstract_state = setup.abstract_sharded_state()
  start = time.perf_counter()
  compiled = step_lib.JittedStep(setup).lower(abstract_state, batch).compile()
  compile_s = time.perf_counter() - start
  print(f"compiled in {compile_s:.0f} s", flush=True)
  memory = compiled.memory_analysis()
  xla_flops = float(step_lib.xla_cost(compiled).get("flops", 0.0))
  # XLA counts a scanned layer stack once; the analytic count is the model's (global batch,
  # split evenly over the devices).
  flops = registry.of(config.model).train_step_flops(
      config, {k: v.shape for k, v in batch.items()}) / devices
  comm = collective_bytes(compiled.as_text())
  args_b, temp_b = memory.argument_size_in_bytes, memory.temp_size_in_bytes
  print(f"per device: arguments {args_b / 2**30:.2f} GiB (params, optimizer, EMA, queues), "
        f"temporaries {temp_b / 2**30:.2f} GiB, total {(args_b + temp_b) / 2**30:.2f} GiB")
  print(f"per device: {flops / 1e12:.2f} TFLOP per step (analytic; XLA cost analysis "
        f"{xla_flops / 1e12:.2f}, scanned stacks counted once)")
  print("collective bytes per device: " + ", ".join(
      f"{k} {v / 2**30:.2f} GiB" for k, v in comm.items() if v))
  raw = dict(config=_CONFIG.value, devices=devices, mesh=list(config.mesh.shape),
             per_device_batch=_PER_DEVICE.value, frames=_FRAMES.value if video else 0,
             seq_length=int(config.data.max_length) if not video else 0, dtype=_DTYPE.value,
             remat=_REMAT.value, attention=_ATTENTION.value, compile_s=compile_s,
             argument_bytes=args_b, temp_bytes=temp_b, model_flops=flops,
             xla_flops=xla_flops, collective_bytes=comm)
  for name in HARDWARE:
    print("  " + roofline.format_prediction(name, roofline.predict(raw, name, _OVERLAP.value)))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(raw, f, indent=1)
    print(f"raw figures -> {_OUT.value}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
