r"""Sharded forward of a task model on synthetic inputs: shapes, loss, timing, memory.

    python -m mplug2_jax.benchmark --config configs/videoqa.py:tiny [--steps 5]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mplug2_jax.benchmark \
        --config configs/videoqa.py:tiny --config.mesh.shape="(2,2,2)"

Validates the config (before any compute), builds the mesh, initialises the parameters
directly in their sharded layout, compiles the task forward + loss once (printing XLA's
memory analysis) and times `--steps` calls. Prints step time and samples/s.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed forward steps after compilation.")


def synthetic_batch(config, rng):
  """Random inputs of the task's shapes (CLIP-normalised noise video, random token ids)."""
  import jax
  import jax.numpy as jnp
  from mplug2_jax.models import mplug2

  batch = mplug2.dummy_batch(config.model, config.batch_size, config.text_length)
  keys = iter(jax.random.split(rng, len(batch)))
  out = {}
  for name, value in batch.items():
    key = next(keys)
    if name == "video":
      out[name] = jax.random.normal(key, value.shape, jnp.float32)
    elif name.endswith("_ids"):
      out[name] = jax.random.randint(key, value.shape, 104, config.model.text.vocab_size)
      out[name] = out[name].at[:, 0].set(101)
    else:
      out[name] = value
  return out


def task_loss(config, out, batch):
  import jax.numpy as jnp
  from mplug2_jax.train import losses

  task = config.model.task
  if task == "caption":
    return losses.caption_loss(out["logits"], batch["caption_ids"])
  if task in ("videoqa", "grounding"):
    weights = jnp.ones(batch["answer_ids"].shape[0])
    return losses.answer_loss(out["logits"], batch["answer_ids"], weights, config.batch_size)
  return sum(jnp.mean(jnp.abs(v)) for v in out.values())


def main(argv):
  del argv
  import jax
  import numpy as np
  from mplug2_jax import config_lib, sharding
  from mplug2_jax.models import mplug2

  config = _CONFIG.value
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices; "
        f"task {config.model.task}, size {config.model.size}")

  model = mplug2.build(config.model)
  rng = jax.random.key(config.seed)
  batch = jax.device_put(synthetic_batch(config, rng), sharding.batch_sharding(mesh, config))
  t0 = time.perf_counter()
  params, _ = sharding.init_params(model, batch, rng, mesh, config)
  print(f"params {sharding.count_params(params):,} initialised sharded in "
        f"{time.perf_counter() - t0:.1f}s")

  def forward(params, batch):
    out, _ = model.apply({"params": params}, batch)
    return task_loss(config, out, batch)

  with sharding.activate(mesh, config):
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(params, batch).compile()
    print(f"compiled in {time.perf_counter() - t0:.1f}s")
    memory = compiled.memory_analysis()
    if memory is not None:
      print(f"memory per device: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
            f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")
    loss = compiled(params, batch).block_until_ready()
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      loss = compiled(params, batch).block_until_ready()
      times.append(time.perf_counter() - t0)
  step = float(np.median(times)) if times else float("nan")
  print(f"loss {float(loss):.4f}; forward step {step * 1e3:.1f} ms (median of {len(times)}), "
        f"{config.batch_size / step:.1f} samples/s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
