r"""Train-step, encoder and generation benchmark on this machine.

    python -m mplug2_jax.benchmark --config configs/videoqa.py:base --batch 4 --frames 4
    python -m mplug2_jax.benchmark --config configs/caption.py:tiny --steps 10

Builds the task model with random weights and the real jitted train step (forward,
backward, optimizer, EMA / queues where the task has them) on synthetic batches of the
task's shapes, then prints: compile time, median step time over `--steps` steps after
`--warmup`, samples/s, model FLOPs per step (analytic, the family's `train_step_flops`, and XLA's cost
analysis of the compiled step, which counts a scanned layer stack once), achieved FLOP/s and MFU against
`--peak_tflops` or, by default, against the fp32 matmul ceiling measured in the same run.
With `--encoder` / `--generation` it also times the video-encoder forward and cached
beam-search captioning (videos/s). The config is validated before any compute.
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from mplug2_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_TASK = flags.DEFINE_string("task", "", "Override config.model.task.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch (0 = config.batch_size).")
_FRAMES = flags.DEFINE_integer("frames", 0, "Frames per video (0 = config.model.num_frames).")
_TEXT = flags.DEFINE_integer("text_length", 0, "Text tokens of every text field (0 = the "
                            "config's data lengths).")
_ANSWER = flags.DEFINE_integer("answer_length", 0,
                               "Answer tokens for videoqa/pretrain (0 = --text_length).")
_ACCUM = flags.DEFINE_integer("accum_steps", 1,
                              "Micro-batches per step (the official CPU baseline: 1; "
                              "0 = the config's optimizer.accum_steps).")
_DTYPE = flags.DEFINE_string("dtype", "float32",
                             "Compute dtype (the official CPU baseline is fp32; '' = config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak for MFU; 0 = measured matmul ceiling.")
_ENCODER = flags.DEFINE_bool("encoder", True, "Also time the video-encoder forward.")
_PROFILE = flags.DEFINE_string("profile", "", "Trace one train step into this directory and "
                                "print the top XLA operations and time per kind of operation.")
_GENERATION = flags.DEFINE_bool("generation", True, "Also time beam-search captioning.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "On CPU: split the host into this many JAX devices and run the batch "
    "data-parallel over them (mesh (N, 1, 1)); one per physical core uses 2-core machines "
    "better than one device with a 2-thread pool (docs/performance.md). 0 = one device.")
_DATA = flags.DEFINE_string("data", "", "A built dataset folder of the task (e.g. the demo "
                            "set built at 224 px): each timed step then takes its batch from "
                            "the real Grain pipeline, decoding beside the step.")
_LOADER_WORKERS = flags.DEFINE_integer("loader_workers", 2,
                                       "Grain worker processes with --data (0 = in-process).")


def main(argv):
  del argv
  from mplug2_jax import hostenv
  hostenv.reexec_with_malloc_hugepages()  # see hostenv.py: per-step page faults
  import jax
  import jax.numpy as jnp

  if _HOST_DEVICES.value:  # before the CPU backend starts
    jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
  from mplug2_jax import experiment, sharding
  from mplug2_jax.benchmark import common
  from mplug2_jax.layers import attention_op
  from mplug2_jax.models import registry
  from mplug2_jax.train import state as state_lib
  from mplug2_jax.train import step as step_lib

  config = _CONFIG.value
  if _TASK.value:
    config.model.task = _TASK.value
  if _FRAMES.value:
    config.model.num_frames = _FRAMES.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _ACCUM.value:
    config.optimizer.accum_steps = _ACCUM.value
  if _BATCH.value:
    config.batch_size = _BATCH.value
  if _HOST_DEVICES.value:
    config.mesh.shape = (_HOST_DEVICES.value,) + (1,) * (len(config.mesh.axes) - 1)
  common.set_text_lengths(config, _TEXT.value, _ANSWER.value)
  config.total_steps = max(config.total_steps, 1000)
  experiment.validate(config, jax.device_count())
  m = config.model
  family = registry.of(m)
  batch_size = config.batch_size

  mesh = sharding.make_mesh(config)
  print(f"{m.task} {m.size}: batch {batch_size}, {m.num_frames} frames x {m.image_size} px, "
        f"text {_TEXT.value or 'as configured'}, {m.dtype} compute, mesh {dict(mesh.shape)} on "
        f"{jax.device_count()} {jax.default_backend()} device(s), attention "
        f"{attention_op.resolve_attention(m.attention, m.dtype)}, remat {m.remat_policy}, "
        f"accum_steps {config.optimizer.accum_steps}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
  batch = jax.device_put(common.synthetic_batch(config), sharding.batch_sharding(mesh, config))
  setup = state_lib.TrainSetup(config, mesh, batch)
  start = time.perf_counter()
  state = setup.init()
  jax.block_until_ready(state)
  print(f"params {sharding.count_params(state.params):,}; state initialised in "
        f"{time.perf_counter() - start:.1f}s", flush=True)

  step = step_lib.JittedStep(setup)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  xla_flops = step_lib.xla_cost(compiled).get("flops")
  memory = compiled.memory_analysis()
  analytic = family.train_step_flops(config, {k: v.shape for k, v in batch.items()})

  holder = {"state": state}
  next_batch = lambda: batch
  if _DATA.value:
    next_batch = _loader(config, mesh, batch)

  def one_step():
    holder["state"], metrics = compiled(holder["state"], next_batch())
    return metrics

  # The ceiling is measured before and after the timed steps and the higher figure is
  # used: on these shared VMs one measurement can read 20% low, which would flatter MFU.
  ceiling = lambda: common.matmul_ceiling_gflops(jnp.dtype(m.dtype))
  before = None if _PEAK.value else ceiling()
  step_s = common.timed(one_step, steps=_STEPS.value, warmup=_WARMUP.value)
  if _PEAK.value:
    peak = _PEAK.value * 1e3
    peak_row = ("peak GFLOP/s", f"{peak:.1f}")
  else:
    after = ceiling()
    peak = max(before, after)
    peak_row = (f"peak GFLOP/s (measured {m.dtype} matmul ceiling)",
                f"{peak:.1f} (before / after the steps: {before:.1f} / {after:.1f})")
  flops = analytic or xla_flops or 0.0
  achieved = flops / step_s / 1e9
  rows = [
      ("compile", f"{compile_s:.1f} s"),
      ("train step (median)", f"{step_s:.3f} s over {_STEPS.value} steps"),
      ("samples/s", f"{batch_size / step_s:.3f}"),
      ("model GFLOP/step (analytic)", f"{analytic / 1e9:.1f}" if analytic else "n/a"),
      ("model GFLOP/step (XLA cost analysis)", f"{xla_flops / 1e9:.1f}" if xla_flops else "n/a"),
      ("achieved GFLOP/s", f"{achieved:.1f}"),
      peak_row,
      ("MFU", f"{100 * achieved / peak:.1f}%"),
  ]
  if memory is not None:
    rows.append(("temporaries (XLA)", f"{memory.temp_size_in_bytes / 2**30:.2f} GiB"))

  params = holder["state"].params
  model = family.build(m)
  if _ENCODER.value and m.task != "classification":
    encode = jax.jit(lambda p, v: model.apply({"params": p}, v, method="embed_image")[0])
    encoder_s = common.timed(encode, params, batch["video"], steps=max(3, _STEPS.value // 2))
    rows.append(("video encoder + universal forward", f"{encoder_s:.3f} s, "
                 f"{batch_size / encoder_s:.2f} videos/s"))
  if _GENERATION.value and m.task == "caption":
    import ml_collections
    settings = ml_collections.ConfigDict(dict(beam_size=5, min_length=4, max_length=20))
    caption = family.predict.caption(m, settings)
    gen_s = common.timed(caption, params, batch["video"], steps=3)
    rows.append(("beam-search captioning (beam 5, 20 tokens)",
                 f"{gen_s:.3f} s, {batch_size / gen_s:.2f} videos/s"))
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"  {name:<{width}}  {value}")
  if _PROFILE.value:
    hlo_text = compiled.as_text()
    os.makedirs(_PROFILE.value, exist_ok=True)
    with open(os.path.join(_PROFILE.value, "train_step.hlo.txt"), "w") as f:
      f.write(hlo_text)  # to read a top operation's fusion by its name
    ops = common.profile_top_ops(one_step, _PROFILE.value, hlo_text, top=10_000)
    total = sum(seconds for _, seconds, *_ in ops)
    print(f"profile of one train step: {total:.2f} s in XLA operations; share per kind:")
    for kind, share in list(common.op_kind_shares(ops).items())[:8]:
      print(f"  {kind:<40} {100 * share:5.1f}%")
    print("top operations (seconds, executions, result, source):")
    for name, seconds, n, shape, source in ops[:15]:
      print(f"  {seconds:7.3f} s x{n:<3d} {name:<32} {shape:<28} {source[-90:]}")


def _loader(config, mesh, synthetic):
  """`next()` of the task's real Grain pipeline over `--data`, checked against the shapes
  the step was compiled for (a mismatch names the field)."""
  from mplug2_jax import sharding
  from mplug2_jax.data import pipeline

  config.data.mixture = ((_DATA.value, 1.0),)
  config.data.num_workers = _LOADER_WORKERS.value
  it = pipeline.make_iterator(config.data, split=config.data.train_split,
                              batch_size=config.batch_size, model_cfg=config.model,
                              sharding=sharding.batch_sharding(mesh, config))
  first = next(it)
  for key, value in synthetic.items():
    if key not in first or (first[key].shape, first[key].dtype) != (value.shape, value.dtype):
      raise ValueError(f"--data {_DATA.value}: batch field {key!r} has shape "
                       f"{getattr(first.get(key), 'shape', None)}, the step expects "
                       f"{value.shape} (build the data at the benchmark's sizes)")
  print(f"loader: {_DATA.value}, {_LOADER_WORKERS.value} Grain worker(s)", flush=True)
  return lambda: {k: v for k, v in next(it).items() if k in synthetic}


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
