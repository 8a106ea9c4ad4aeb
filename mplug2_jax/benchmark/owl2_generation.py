r"""mPLUG-Owl2 generation: decode speed on this machine, and the AOT-compiled memory of
prefill + cached decoding for large meshes.

    # tokens/s of cached greedy decoding (tiny on CPU; random weights)
    python -m mplug2_jax.benchmark.owl2_generation --mode decode --size tiny --batch 8
    # per-device memory of the compiled prefill + decode loop (never run), 8 fake devices
    python -m mplug2_jax.benchmark.owl2_generation --mode aot --size 7b --batch 8 \
        --devices 8 --mesh "(1,8,1)"

decode: one jitted `generation.generate` call (prefill of `--prompt` text tokens with
`--images` images per row, then `--new_tokens` greedy steps, no early stop) is timed
against the same call with one new token (prefill only); decode tokens/s =
batch x (new_tokens - 1) / (full - prefill), median of `--repeats` runs each.

aot: parameters in `--dtype` (bf16 serving, as the official fp16), sharded by the logical
rules on the mesh (fsdp x tensor), the batch over data x fsdp; reports
`compiled.memory_analysis()` per device: arguments (parameters, batch), outputs and
temporaries (key/value caches of prompt + new tokens, activations).

Imports only jax and the model packages (no input-pipeline dependencies).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

_MODE = flags.DEFINE_enum("mode", "decode", ["decode", "aot"], "What to measure.")
_SIZE = flags.DEFINE_string("size", "tiny", "Owl2 size preset (tiny | 7b).")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts per call.")
_PROMPT = flags.DEFINE_integer("prompt", 32, "Text tokens per prompt (image placeholders "
                               "included).")
_IMAGES = flags.DEFINE_integer("images", 1, "Images per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "decode: timed runs (median).")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute and parameter dtype (default: float32 "
                             "for decode, bfloat16 for aot).")
_DEVICES = flags.DEFINE_integer("devices", 8, "aot: fake CPU devices.")
_MESH = flags.DEFINE_string("mesh", "", "aot: mesh (data,fsdp,tensor); default (1,devices,1).")


def model_config(size: str, dtype: str):
  from mplug2_jax.models import registry

  m = registry.get("owl2").model_config(size)
  m.dtype = m.param_dtype = dtype
  registry.validate(m)
  return m


def prompt_batch(m, batch: int, prompt: int, images: int, seed: int = 0) -> dict:
  """Random prompts: BOS, the image placeholders after it, then text; full masks."""
  import numpy as np

  from mplug2_jax.tokens import IMAGE_TOKEN_INDEX

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, m.llm.vocab_size, (batch, prompt)).astype(np.int32)
  ids[:, 0] = m.llm.bos_token_id
  ids[:, 1:1 + images] = IMAGE_TOKEN_INDEX
  out = {"input_ids": ids, "attention_mask": np.ones((batch, prompt), np.int32)}
  if images:
    size = m.image_size
    out["images"] = rng.standard_normal((batch, images, size, size, 3)).astype(np.float32)
    out["image_mask"] = np.ones((batch, images), np.int32)
  return out


def generate_fn(m, new_tokens: int):
  import jax

  from mplug2_jax.models import registry

  family = registry.get("owl2")
  model = family.build(m, use_cache=True)

  def run(params, batch):
    return family.generation.generate(
        model, params, batch["input_ids"], batch["attention_mask"], batch.get("images"),
        batch.get("image_mask"), max_new_tokens=new_tokens).tokens

  return jax.jit(run)


def decode(m) -> None:
  import jax

  from mplug2_jax.benchmark import common
  from mplug2_jax.models import registry

  family = registry.get("owl2")
  batch = {k: jax.numpy.asarray(v) for k, v in prompt_batch(
      m, _BATCH.value, _PROMPT.value, _IMAGES.value).items()}
  params = jax.jit(family.build(m).init)(jax.random.key(0), family.init_batch(m))["params"]
  times = {}
  for steps in (1, _NEW.value):
    fn = generate_fn(m, steps)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, batch))
    compile_s = time.perf_counter() - start
    times[steps] = common.timed(fn, params, batch, steps=_REPEATS.value, warmup=0)
    print(f"{steps:4d} new tokens: {times[steps] * 1e3:8.1f} ms per call (first call with "
          f"compile {compile_s:.1f} s)", flush=True)
  decode_s = times[_NEW.value] - times[1]
  tokens = _BATCH.value * (_NEW.value - 1)
  length = _PROMPT.value + _IMAGES.value * (family.tokens_per_image(m) - 1)
  print(f"owl2 {m.size} {m.dtype}: batch {_BATCH.value}, prompt {_PROMPT.value} tokens + "
        f"{_IMAGES.value} image(s) = {length} positions, {_NEW.value} new tokens: prefill "
        f"{times[1] * 1e3:.1f} ms, decode {tokens / decode_s:.1f} tokens/s "
        f"({decode_s / (_NEW.value - 1) * 1e3:.2f} ms per step) on "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")


def aot(m) -> None:
  import jax
  import ml_collections

  from mplug2_jax import config_lib, sharding
  from mplug2_jax.models import registry

  family = registry.get("owl2")
  config = ml_collections.ConfigDict()
  config.model = m
  config.mesh = config_lib.mesh_config(eval(_MESH.value) if _MESH.value  # noqa: S307
                                       else (1, _DEVICES.value, 1))
  config.sharding_rules = config_lib.DEFAULT_RULES
  mesh = sharding.make_mesh(config)
  model = family.build(m)
  shardings = sharding.param_shardings(model, family.init_batch(m), mesh, config)
  with sharding.activate(mesh, config):
    abstract = sharding.unboxed(sharding.abstract_params(model, family.init_batch(m)))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  batch_sharding = sharding.batch_sharding(mesh, config)
  host = prompt_batch(m, _BATCH.value, _PROMPT.value, _IMAGES.value)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in host.items()}
  start = time.perf_counter()
  with sharding.activate(mesh, config):
    compiled = generate_fn(m, _NEW.value).lower(params, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  length = _PROMPT.value + _IMAGES.value * (family.tokens_per_image(m) - 1)
  print(f"owl2 {m.size} {m.dtype}: batch {_BATCH.value}, prompt {_PROMPT.value} tokens + "
        f"{_IMAGES.value} image(s) = {length} positions + {_NEW.value} new tokens, mesh "
        f"{dict(mesh.shape)}, compiled in {compile_s:.0f} s")
  args, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
  temps = memory.temp_size_in_bytes
  print(f"per device: arguments {gib(args):.2f} GiB, outputs {gib(outputs):.3f} GiB, "
        f"temporaries {gib(temps):.2f} GiB, total {gib(args + outputs + temps):.2f} GiB")


def main(argv):
  del argv
  if _MODE.value == "aot":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  dtype = _DTYPE.value or ("bfloat16" if _MODE.value == "aot" else "float32")
  m = model_config(_SIZE.value, dtype)
  (aot if _MODE.value == "aot" else decode)(m)


if __name__ == "__main__":
  app.run(main)
