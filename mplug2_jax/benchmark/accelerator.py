r"""One prepared accelerator check: the figures a short GPU window should give.

    bash launch/accelerator_check.sh OUT_DIR            (about 8 minutes on one H100)
    bash launch/accelerator_check.sh OUT_DIR --cpu_smoke  (tiny configs on the CPU: CI)

In order, each item skipped when the time budget (`--budget_s`) would run out:
  1. the bf16 matmul ceiling (8192^3 `jnp.dot`);
  2. mPLUG-2 train steps in bf16 with cuDNN attention (base VideoQA and caption at
     4 x 224; large pretraining at 16 x 224; then large VideoQA and caption), each at the
     largest per-device batch that fits: one compile at a probe batch gives the memory
     per example (XLA's memory analysis), a second at the batch that fits 90% of the
     device's memory; step time (median), samples/s, MFU against 989 TFLOP/s (H100 bf16
     dense) and against the measured ceiling, the device's real peak memory beside the
     compiled figure (the plan tool's number for one device);
  3. cached beam-search captioning (beam 5, 4-20 tokens) videos/s, base, 4 x 224;
  4. mPLUG-Owl2: a 7B-shaped stage-2 train step (sequence 2,048 with one 448-px image, the
     ViT and abstractor in the step, 8 of the 32 LLM layers so that it fits one GPU) and
     7B decode tokens/s (bf16 weights, batch 8, greedy, fixed-size KV cache).
Writes `OUT_DIR/accelerator.json` and `OUT_DIR/accelerator.md`.

The path imports no input-pipeline or metric package (grain, tfds, av, pycocoevalcap):
the accelerator image has jax, flax, optax and orbax, and ml_collections travels as a
wheel (launch/accelerator_check.sh).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
import traceback

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Folder for accelerator.json / accelerator.md.")
_SMOKE = flags.DEFINE_bool("cpu_smoke", False, "Tiny configs, one step each (CI on CPU).")
_BUDGET = flags.DEFINE_float("budget_s", 450.0, "Stop starting new items after this long.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Device peak for MFU (H100 SXM bf16 dense).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per train-step item.")
flags.mark_flag_as_required("out")

REPO = pathlib.Path(__file__).resolve().parents[2]
# (name, config file, frames, text lengths (text, answer)); the accelerator runs in bf16.
TRAIN_ITEMS = (
    ("VideoQA base 4x224", "configs/videoqa.py:base", 4, (50, 5)),
    ("caption base 4x224", "configs/caption.py:base", 4, (20, 0)),
    ("pretrain large 16x224", "configs/pretrain.py:large", 16, (30, 0)),
    ("VideoQA large 16x224", "configs/videoqa.py:large", 16, (50, 5)),
    ("caption large 16x224", "configs/caption.py:large", 16, (20, 0)),
)
SMOKE_ITEMS = (("caption tiny", "configs/caption.py:tiny", 1, (8, 0)),)
OWL2_TRAIN = ("Owl2 7B-shaped stage 2 (8 of 32 LLM layers), 2048 tokens", "configs/owl2.py:7b")
OWL2_SMOKE = ("Owl2 tiny", "configs/owl2.py:tiny")
OWL2_LLM_LAYERS = 8


def _device_memory() -> int:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("bytes_limit", 0))


def _peak_memory() -> int:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("peak_bytes_in_use", 0))


def _config(spec: str, frames: int, lengths, batch: int, smoke: bool):
  from mplug2_jax import experiment
  from mplug2_jax.benchmark import common

  config = experiment.load(f"{REPO / spec.split(':')[0]}:{spec.split(':')[1]},synthetic=1")
  m = config.model
  m.num_frames = frames
  m.dtype = "float32" if smoke else "bfloat16"
  m.attention = "explicit" if smoke else "cudnn"
  config.batch_size = batch
  config.optimizer.accum_steps = 1
  config.mesh.shape = (1, 1, 1)
  config.total_steps = max(config.total_steps, 1000)
  if "objective" in config and config.objective.queue_size:
    config.objective.queue_size = max(batch, config.objective.queue_size // batch * batch)
  common.set_text_lengths(config, *lengths)
  if smoke:  # the smallest model of the code path: CI compiles it in seconds
    m.vision.layers = m.text.decoder_layers = 1
  experiment.validate(config, 1)
  return config


def _owl2_config(spec: str, batch: int, smoke: bool):
  from mplug2_jax import experiment

  config = experiment.load(f"{REPO / spec.split(':')[0]}:{spec.split(':')[1]},synthetic=1")
  m = config.model
  m.dtype = "float32" if smoke else "bfloat16"
  m.attention = "explicit" if smoke else "cudnn"
  if not smoke:
    m.llm.layers = OWL2_LLM_LAYERS
  config.batch_size = batch
  config.optimizer.accum_steps = 1
  config.mesh.shape = (1, 1, 1)
  config.total_steps = max(config.total_steps, 1000)
  experiment.validate(config, 1)
  return config


def _compile(config):
  import jax

  from mplug2_jax import sharding
  from mplug2_jax.benchmark import common
  from mplug2_jax.train import state as state_lib
  from mplug2_jax.train import step as step_lib

  mesh = sharding.make_mesh(config, jax.devices()[:1])
  batch_sharding = sharding.batch_sharding(mesh, config)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in common.batch_spec(config).items()}
  setup = state_lib.TrainSetup(config, mesh, spec)
  compiled = step_lib.JittedStep(setup).lower(setup.abstract_sharded_state(), spec).compile()
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes) if mem is not None else 0
  return setup, compiled, mesh, batch_sharding, mem, total


def train_item(name, make_config, smoke, ceiling_tflops):
  """Largest batch that fits, then timed steps; `make_config(batch)` builds the config."""
  import jax
  import numpy as np

  from mplug2_jax.benchmark import common
  from mplug2_jax.models import registry

  limit = _device_memory()
  batch = probe = 2 if smoke else 4
  if limit and not smoke:
    _, _, _, _, mem, _ = _compile(make_config(probe))
    fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    per_example = max(mem.temp_size_in_bytes / probe, 1.0)
    fits = int((0.9 * limit - fixed) // per_example)
    batch = max(1, 2 ** int(np.floor(np.log2(max(fits, 1)))))
  for attempt in range(4):
    config = make_config(batch)
    setup, compiled, mesh, batch_sharding, mem, total = _compile(config)
    try:
      state = setup.init()
      data = jax.device_put(common.synthetic_batch(config), batch_sharding)
      holder = {"state": state}

      def one_step(compiled=compiled, holder=holder, data=data):
        holder["state"], metrics = compiled(holder["state"], data)
        return metrics

      step_s = common.timed(one_step, steps=1 if smoke else _STEPS.value,
                            warmup=0 if smoke else 2)
      break
    except Exception as e:  # noqa: BLE001  (out of memory: halve the batch)
      if "RESOURCE_EXHAUSTED" not in str(e) or batch == 1 or attempt == 3:
        raise
      batch //= 2
  flops = registry.of(config.model).train_step_flops(
      config, {k: v.shape for k, v in common.batch_spec(config).items()})
  achieved = flops / step_s / 1e12
  return {"item": name, "batch": batch,
          "step_s": step_s, "samples_per_s": batch / step_s,
          "model_tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
          "mfu_vs_peak": achieved / _PEAK.value,
          "mfu_vs_ceiling": achieved / ceiling_tflops if ceiling_tflops else None,
          "compiled_bytes": total, "peak_bytes_in_use": _peak_memory(),
          "device_bytes_limit": limit, "remat": config.model.remat_policy}


def beam_item(smoke):
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from mplug2_jax.benchmark import common
  from mplug2_jax.models import registry

  spec = "configs/caption.py:tiny" if smoke else "configs/caption.py:base"
  config = _config(spec, 1 if smoke else 4, (20, 0), 2 if smoke else 16, smoke)
  family = registry.of(config.model)
  model = family.build(config.model)
  params = jax.jit(model.init)(jax.random.key(0), family.init_batch(config.model))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  settings = ml_collections.ConfigDict(dict(beam_size=5, min_length=4, max_length=20))
  caption = family.predict.caption(config.model, settings)
  video = jnp.asarray(np.random.default_rng(0).normal(
      size=common.batch_spec(config)["video"].shape), config.model.dtype)
  seconds = common.timed(caption, params, video, steps=1 if smoke else 3,
                         warmup=0 if smoke else 1)
  return {"item": "beam-search captioning", "config": spec, "batch": video.shape[0],
          "seconds_per_batch": seconds, "videos_per_s": video.shape[0] / seconds}


def owl2_decode_item(smoke):
  """Prefill + greedy decode of the 7B (bf16 weights) at batch 8: new tokens per second."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mplug2_jax.benchmark import common
  from mplug2_jax.models import registry

  spec = OWL2_SMOKE[1] if smoke else OWL2_TRAIN[1]
  config = _owl2_config(spec, 2 if smoke else 8, smoke)
  m = config.model
  if not smoke:
    m.llm.layers = 32  # the real 7B for decoding
  family = registry.of(m)
  config.data.max_length = 16 if smoke else 256  # prompt ids with one image placeholder
  new_tokens = 4 if smoke else 128
  dtype = jnp.dtype(m.dtype)
  model = family.build(m)

  @jax.jit
  def init(key):
    params = model.init(key, family.init_batch(m))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    return jax.tree.map(lambda x: x.astype(dtype), params)

  params = init(jax.random.key(0))
  schema = family.batch_schema(m, config.data, config.batch_size)
  batch = family.synthetic_batch(m, schema, np.random.default_rng(0), full_length=True)
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "labels"}
  settings = family.predict.default_settings()
  settings.update(max_new_tokens=new_tokens, temperature=0.0, stop_on_eos=False)
  generate = family.predict.generate_fn(m, settings)
  seconds = common.timed(lambda: generate(params, batch), steps=1 if smoke else 3,
                         warmup=0 if smoke else 1)
  b = config.batch_size
  return {"item": "Owl2 decode (prefill + greedy)", "config": spec, "batch": b,
          "prompt_ids": config.data.max_length, "new_tokens": new_tokens,
          "seconds_per_batch": seconds, "tokens_per_s": b * new_tokens / seconds,
          "peak_bytes_in_use": _peak_memory()}


def markdown(result: dict) -> str:
  lines = [f"device: {result['device']}; jax {result['jax']}",
           f"bf16 matmul ceiling: {result.get('ceiling_tflops', 0):.1f} TFLOP/s", "",
           "| item | batch | step | samples/s | MFU (989) | MFU (ceiling) | peak mem / compiled GiB |",
           "|---|---:|---:|---:|---:|---:|---|"]
  for r in result["train"]:
    if "error" in r:
      lines.append(f"| {r['item']} | | | | | | error: {r['error'][:80]} |")
      continue
    ceil = f"{100 * r['mfu_vs_ceiling']:.1f}%" if r["mfu_vs_ceiling"] else ""
    lines.append(f"| {r['item']} | {r['batch']} | {r['step_s']:.3f} s | "
                 f"{r['samples_per_s']:.2f} | {100 * r['mfu_vs_peak']:.1f}% | {ceil} | "
                 f"{r['peak_bytes_in_use'] / 2**30:.1f} / {r['compiled_bytes'] / 2**30:.1f} |")
  for r in result.get("generation", []):
    if "error" in r:
      lines.append(f"\n{r['item']}: error: {r['error'][:120]}")
    elif "tokens_per_s" in r:
      lines.append(f"\n{r['item']} (batch {r['batch']}, {r['prompt_ids']} prompt ids + one "
                   f"image, {r['new_tokens']} new tokens): {r['seconds_per_batch']:.3f} s per "
                   f"batch, {r['tokens_per_s']:.1f} new tokens/s")
    else:
      lines.append(f"\n{r['item']} (batch {r['batch']}): {r['seconds_per_batch']:.3f} s per "
                   f"batch, {r['videos_per_s']:.2f} videos/s")
  if result.get("skipped"):
    lines.append("\nskipped for time: " + ", ".join(result["skipped"]))
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from mplug2_jax.benchmark import common

  start = time.time()
  smoke = _SMOKE.value
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "train": [], "generation": [], "skipped": []}
  if not smoke and jax.default_backend() == "cpu":
    raise app.UsageError("no accelerator: run with --cpu_smoke on a CPU")

  def save():
    (out / "accelerator.json").write_text(json.dumps(result, indent=1))
    (out / "accelerator.md").write_text(markdown(result))

  n = 256 if smoke else 8192
  result["ceiling_tflops"] = common.matmul_ceiling_gflops(
      jnp.float32 if smoke else jnp.bfloat16, n=n) / 1e3
  print(f"ceiling {result['ceiling_tflops']:.1f} TFLOP/s", flush=True)
  items = [(name, functools.partial(_config, spec, frames, lengths, smoke=smoke))
           for name, spec, frames, lengths in (SMOKE_ITEMS if smoke else TRAIN_ITEMS)]
  name, spec = OWL2_SMOKE if smoke else OWL2_TRAIN
  items.append((name, functools.partial(_owl2_config, spec, smoke=smoke)))
  beam = ("beam-search captioning", lambda: beam_item(smoke))
  decode = ("Owl2 decode (prefill + greedy)", lambda: owl2_decode_item(smoke))
  # mPLUG-2 steps, beam search, then Owl2: each item is skipped once the budget is spent.
  work = [("train", n, functools.partial(train_item, n, f, smoke, result["ceiling_tflops"]))
          for n, f in items[:-1]] + [("generation", *beam)] + [
              ("train", items[-1][0],
               functools.partial(train_item, items[-1][0], items[-1][1], smoke,
                                 result["ceiling_tflops"])), ("generation", *decode)]
  for kind, name, run in work:
    if not smoke and time.time() - start > _BUDGET.value:
      result["skipped"].append(name)
      continue
    try:
      r = run()
    except Exception as e:  # noqa: BLE001  (one failed item must not lose the others)
      r = {"item": name, "error": f"{type(e).__name__}: {e}"}
      traceback.print_exc()
    result[kind].append(r)
    print(json.dumps(r), flush=True)
    save()
  result["seconds"] = time.time() - start
  save()
  print(markdown(result), flush=True)


if __name__ == "__main__":
  app.run(main)
