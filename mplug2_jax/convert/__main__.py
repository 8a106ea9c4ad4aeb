r"""Checkpoint conversion between the official PyTorch mPLUG-2 and mplug2_jax.

  # official .pth / .bin / .safetensors -> orbax checkpoint for a config
  python -m mplug2_jax.convert import-official --checkpoint mplug2_videoqa.pth \
      --config configs/videoqa.py:large --out /ckpt/videoqa_large
  # orbax checkpoint -> official keys and layouts (load_state_dict(strict=True) works)
  python -m mplug2_jax.convert export-official --checkpoint /ckpt/videoqa_large \
      --out videoqa_large.safetensors [--reference mplug2_videoqa.pth]
  # pretraining init from CLIP (OpenAI or HF) and BERT (HF) weights
  python -m mplug2_jax.convert init-pretrained --config configs/pretrain.py:large \
      --clip ViT-L-14.safetensors --bert bert-large-uncased/model.safetensors --out /ckpt/init

Every official key is either converted or on the documented list of keys the official
model builds but never runs; anything else stops the conversion naming the key.
"""

from __future__ import annotations

import resource
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (import, init).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Input checkpoint (file or directory).")
_OUT = flags.DEFINE_string("out", None, "Output directory (orbax) or file (.safetensors/.pth).")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "export: official checkpoint to copy never-used tensors from.")
_CLIP = flags.DEFINE_string("clip", None, "init: CLIP checkpoint (OpenAI or HF keys).")
_BERT = flags.DEFINE_string("bert", None, "init: BERT checkpoint (HF keys).")
_POSITIONS = flags.DEFINE_enum(
    "positional_embedding", "resized", ["resized", "zeros"],
    "init: CLIP positional table resized to the grid (fix), or zeros (official quirk).")

COMMANDS = ("import-official", "export-official", "init-pretrained")


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _expected_shapes(model_cfg):
  """Parameter path -> shape from `jax.eval_shape` (nothing allocated)."""
  import jax

  from mplug2_jax import sharding
  from mplug2_jax.models import mplug2

  model = mplug2.build(model_cfg)
  abstract = sharding.unboxed(sharding.abstract_params(model, mplug2.dummy_batch(model_cfg)))
  return {"/".join(p.key for p in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def import_official(config, checkpoint: str, out: str) -> None:
  from mplug2_jax import config_lib
  from mplug2_jax.convert import checkpoints, official

  config_lib.validate(config)
  model_cfg = config.model
  state = official.AdaptedStateDict(checkpoints.LazyStateDict(checkpoint), model_cfg)
  flat = official.to_flax(state, model_cfg, _expected_shapes(model_cfg))
  if state.resized_from is not None:
    print(f"visual positional embedding resized {state.resized_from} -> grid "
          f"{model_cfg.image_size // model_cfg.vision.patch_size}")
  params = checkpoints.nest(flat)
  del flat
  checkpoints.save_params(out, params, model_cfg)
  n = sum(v.size for v in checkpoints.flatten(params).values())
  print(f"imported {n:,} parameters ({model_cfg.task}, {model_cfg.size}) into {out}")


def export_official(checkpoint: str, out: str, reference: str | None) -> None:
  from mplug2_jax.convert import checkpoints, official

  model_cfg = checkpoints.load_model_config(checkpoint)
  flat = checkpoints.flatten(checkpoints.load_params(checkpoint))
  ref = checkpoints.LazyStateDict(reference) if reference else None
  state, counts = official.export_state(flat, model_cfg, ref)
  del flat
  checkpoints.write_state_dict(state, out)
  print(f"exported {len(state)} official keys to {out}: {counts}")
  if counts["zeros"]:
    print(f"  {counts['zeros']} tensors the official model builds but never runs were written "
          f"as zeros (pass --reference to copy them from an official checkpoint)")


def init_pretrained(config, out: str, clip: str | None, bert: str | None,
                    positional_embedding: str) -> None:
  import jax

  from mplug2_jax import config_lib, sharding
  from mplug2_jax.convert import checkpoints, pretrained
  from mplug2_jax.models import mplug2

  config_lib.validate(config)
  if not clip and not bert:
    raise app.UsageError("init-pretrained needs --clip and/or --bert")
  model_cfg = config.model
  model = mplug2.build(model_cfg)
  variables = jax.jit(model.init)(jax.random.key(config.seed), mplug2.dummy_batch(model_cfg))
  fresh = {k: jax.device_get(v) for k, v in
           checkpoints.flatten(sharding.unboxed(variables["params"])).items()}
  params, report = pretrained.initialise(
      fresh, model_cfg, clip=checkpoints.LazyStateDict(clip) if clip else None,
      bert=checkpoints.LazyStateDict(bert) if bert else None,
      positional_embedding=positional_embedding)
  checkpoints.save_params(out, checkpoints.nest(params), model_cfg)
  print(f"imported {len(report['imported'])} pretrained tensors into {out}")
  print("fresh (official initialisers): " + ", ".join(pretrained.summarise(report["fresh"])))


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m mplug2_jax.convert {{{'|'.join(COMMANDS)}}} ...")
  command = argv[1]
  start = time.perf_counter()
  if not _OUT.value:
    raise app.UsageError("--out is required")
  if command == "import-official":
    if not (_CHECKPOINT.value and _CONFIG.value):
      raise app.UsageError("import-official needs --checkpoint and --config")
    import_official(_CONFIG.value, _CHECKPOINT.value, _OUT.value)
  elif command == "export-official":
    if not _CHECKPOINT.value:
      raise app.UsageError("export-official needs --checkpoint")
    export_official(_CHECKPOINT.value, _OUT.value, _REFERENCE.value)
  else:
    if not _CONFIG.value:
      raise app.UsageError("init-pretrained needs --config")
    init_pretrained(_CONFIG.value, _OUT.value, _CLIP.value, _BERT.value, _POSITIONS.value)
  print(f"done in {time.perf_counter() - start:.1f}s, peak host memory {_peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
  app.run(main)
