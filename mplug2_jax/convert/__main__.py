r"""Checkpoint conversion between the official PyTorch models and mplug2_jax.

  # official .pth / .bin / .safetensors -> parameters directory for a config
  python -m mplug2_jax.convert import-official --checkpoint mplug2_videoqa.pth \
      --config configs/videoqa.py:large --out /ckpt/videoqa_large
  # parameters directory -> official keys and layouts (load_state_dict(strict=True) works)
  python -m mplug2_jax.convert export-official --checkpoint /ckpt/videoqa_large \
      --out videoqa_large.safetensors [--reference mplug2_videoqa.pth]
  # pretraining init from public weights (mPLUG-2: CLIP and BERT)
  python -m mplug2_jax.convert init-pretrained --config configs/pretrain.py:large \
      --clip ViT-L-14.safetensors --bert bert-large-uncased/model.safetensors --out /ckpt/init
  # mPLUG-Owl2: the HF directory both ways (sharded safetensors + index + config.json)
  python -m mplug2_jax.convert import-official --checkpoint mplug-owl2-llama2-7b/ \
      --config configs/owl2.py:7b --out /ckpt/owl2_7b
  python -m mplug2_jax.convert export-official --checkpoint /ckpt/owl2_7b --out owl2_hf/
  python -m mplug2_jax.convert init-pretrained --config configs/owl2.py:7b \
      --llama Llama-2-7b-hf/ --vit clip-vit-large-patch14/ --out /ckpt/owl2_init

The model family comes from the config (`config.model.name`) or, for export, from the
checkpoint's model_config.json. Every official key is either converted or on the family's
documented list of keys the official model builds but never runs; anything else stops the
conversion naming the key. A checkpoint is a file (.safetensors / .pth / .bin), an HF
index file or an HF directory (sharded or not). A family whose conversion package has
`write_official` writes its own output layout (mPLUG-Owl2: the HF directory).
"""

from __future__ import annotations

import importlib
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from mplug2_jax import cli, config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (import, init).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Input checkpoint (file or directory).")
_OUT = flags.DEFINE_string("out", None, "Output directory (orbax) or file (.safetensors/.pth).")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "export: official checkpoint to copy never-used tensors from.")
_CLIP = flags.DEFINE_string("clip", None, "init (mPLUG-2): CLIP checkpoint (OpenAI or HF keys).")
_BERT = flags.DEFINE_string("bert", None, "init (mPLUG-2): BERT checkpoint (HF keys).")
_LLAMA = flags.DEFINE_string("llama", None, "init (mPLUG-Owl2): LLaMA-2 checkpoint (HF keys; "
                             "file, index or directory).")
_VIT = flags.DEFINE_string("vit", None, "init (mPLUG-Owl2): CLIP vision checkpoint (HF keys).")
_POSITIONS = flags.DEFINE_enum(
    "positional_embedding", "resized", ["resized", "zeros"],
    "init: CLIP positional table resized to the grid (fix), or zeros (official quirk).")

_ALLOW_CAST = flags.DEFINE_bool(
    "allow_cast", False, "import: cast float16/bfloat16 tensors to the model's float32 "
    "parameters (without it such a checkpoint is refused, naming the key).")

COMMANDS = ("import-official", "export-official", "init-pretrained")


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _conversion(model_cfg):
  from mplug2_jax.models import registry

  return importlib.import_module(registry.of(model_cfg).CONVERSION)


def _abstract_params(model_cfg) -> dict:
  """Parameter path -> ShapeDtypeStruct from `jax.eval_shape` (nothing allocated)."""
  from mplug2_jax import sharding
  from mplug2_jax.models import registry

  family = registry.of(model_cfg)
  abstract = sharding.abstract_params(family.build(model_cfg), family.init_batch(model_cfg))
  return sharding.flat(sharding.unboxed(abstract))


def check_imported(flat: dict, expected: dict, allow_cast: bool = False) -> dict:
  """`flat` with each tensor checked against the model's parameter (`expected`: path ->
  ShapeDtypeStruct): an integer or boolean tensor where the model has a float parameter, a
  narrower float (float16/bfloat16 -> float32) without `allow_cast`, or a NaN/infinity
  raises ValueError naming the key; allowed casts are applied."""
  import jax.numpy as jnp
  import numpy as np

  from mplug2_jax import param_store

  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    want = expected[key].dtype if key in expected else value.dtype
    if value.dtype != want:
      if not jnp.issubdtype(value.dtype, jnp.floating) and jnp.issubdtype(want, jnp.floating):
        raise ValueError(f"tensor {key}: dtype {value.dtype}, the model's parameter is {want} "
                         "(an integer tensor where weights belong: a wrong or damaged file)")
      if jnp.dtype(value.dtype).itemsize < jnp.dtype(want).itemsize and not allow_cast:
        raise ValueError(f"tensor {key}: dtype {value.dtype}, the model's parameter is "
                         f"{want}; pass --allow_cast to import the {value.dtype} values as "
                         f"{want}")
      value = value.astype(want)
    if jnp.issubdtype(value.dtype, jnp.inexact):
      bad = param_store.count_nonfinite(value)
      if bad:
        raise ValueError(f"tensor {key}: {bad} non-finite values (NaN or infinity)")
    out[key] = value
  return out


def import_official(config, checkpoint: str, out: str, allow_cast: bool = False) -> None:
  from mplug2_jax import param_store
  from mplug2_jax.convert import checkpoints
  from mplug2_jax.models import registry

  registry.validate(config.model)
  model_cfg = config.model
  abstract = _abstract_params(model_cfg)
  expected = {k: v.shape for k, v in abstract.items()}
  flat, notes = _conversion(model_cfg).import_official(
      checkpoints.open_state_dict(checkpoint), model_cfg, expected)
  flat = check_imported(flat, abstract, allow_cast)
  for note in notes:
    print(note)
  n = sum(v.size for v in flat.values())
  param_store.save_params(out, param_store.nest(flat), model_cfg)
  print(f"imported {n:,} parameters ({model_cfg.name} {model_cfg.task}, {model_cfg.size}) "
        f"into {out}")


def export_official(checkpoint: str, out: str, reference: str | None) -> None:
  from mplug2_jax import param_store
  from mplug2_jax.convert import checkpoints

  model_cfg = param_store.load_model_config(checkpoint)
  flat = param_store.flatten(param_store.load_params(checkpoint))
  ref = checkpoints.open_state_dict(reference) if reference else None
  conversion = _conversion(model_cfg)
  if hasattr(conversion, "write_official"):
    for note in conversion.write_official(flat, model_cfg, out, ref):
      print(note)
    return
  state, notes = conversion.export_official(flat, model_cfg, ref)
  del flat
  checkpoints.write_state_dict(state, out)
  print(f"exported {len(state)} official keys to {out}")
  for note in notes:
    print(f"  {note}")


def init_pretrained(config, out: str, paths: dict[str, str | None],
                    positional_embedding: str) -> None:
  import jax

  from mplug2_jax import param_store, sharding
  from mplug2_jax.convert import checkpoints
  from mplug2_jax.models import registry

  registry.validate(config.model)
  model_cfg = config.model
  conversion = _conversion(model_cfg)
  sources = {k: checkpoints.open_state_dict(p) for k, p in paths.items()
             if p and k in conversion.INIT_SOURCES}
  if not sources:
    raise app.UsageError(f"init-pretrained for {model_cfg.name} needs at least one of "
                         + ", ".join(f"--{k}" for k in conversion.INIT_SOURCES))
  family = registry.of(model_cfg)
  variables = jax.jit(family.build(model_cfg).init)(jax.random.key(config.seed),
                                                    family.init_batch(model_cfg))
  fresh = {k: jax.device_get(v) for k, v in
           sharding.flat(sharding.unboxed(variables["params"])).items()}
  params, notes = conversion.init_pretrained(fresh, model_cfg, sources, positional_embedding)
  param_store.save_params(out, param_store.nest(params), model_cfg)
  print(f"wrote {out}")
  for note in notes:
    print(note)


def main(argv):
  try:
    _main(argv)
  except (ValueError, FileNotFoundError) as e:  # bad input, named in `e`: one line
    if isinstance(e, config_lib.ConfigError):
      raise
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
          file=sys.stderr)
    sys.exit(1)


def _main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m mplug2_jax.convert {{{'|'.join(COMMANDS)}}} ...")
  command = argv[1]
  start = time.perf_counter()
  if not _OUT.value:
    raise app.UsageError("--out is required")
  if command == "import-official":
    if not (_CHECKPOINT.value and _CONFIG.value):
      raise app.UsageError("import-official needs --checkpoint and --config")
    import_official(_CONFIG.value, _CHECKPOINT.value, _OUT.value, _ALLOW_CAST.value)
  elif command == "export-official":
    if not _CHECKPOINT.value:
      raise app.UsageError("export-official needs --checkpoint")
    export_official(_CHECKPOINT.value, _OUT.value, _REFERENCE.value)
  else:
    if not _CONFIG.value:
      raise app.UsageError("init-pretrained needs --config")
    init_pretrained(_CONFIG.value, _OUT.value, {"clip": _CLIP.value, "bert": _BERT.value,
                                                "llama": _LLAMA.value, "vit": _VIT.value},
                    _POSITIONS.value)
  print(f"done in {time.perf_counter() - start:.1f}s, peak host memory {_peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
  cli.run(main)
