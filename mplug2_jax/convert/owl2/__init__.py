"""mPLUG-Owl2 conversion: the official HF checkpoint <-> our parameter tree.

  official.py        the key/layout table (both directions), buffers, config.json
  pretrained.py      pre-training init from LLaMA-2 (HF) and a CLIP ViT (HF)
  parity.py          golden cases: config.json -> model, weights, every output array
  large_roundtrip.py the 7B both ways through sharded safetensors, with peak host memory

The generic CLI (`python -m mplug2_jax.convert`) calls the functions below:

  import-official --checkpoint DIR|FILE --config configs/owl2.py:7b --out PARAMS
      DIR: an HF directory (model.safetensors.index.json + shards, or pytorch_model
      shards with their index, or one model.safetensors); its config.json, when present,
      must describe the same architecture as config.model
  export-official --checkpoint PARAMS --out DIR [--reference OFFICIAL]
      DIR: the HF layout (one shard per LLM layer + one for the rest, the index, and
      config.json); a path ending in .safetensors writes one file instead
  init-pretrained --config configs/owl2.py:7b --llama LLAMA2_DIR [--vit CLIP_DIR] --out PARAMS
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import ml_collections
import numpy as np

from mplug2_jax.convert import checkpoints
from mplug2_jax.convert.owl2 import official, pretrained
from mplug2_jax.convert.owl2.official import ConversionError

INIT_SOURCES = ("llama", "vit")  # init-pretrained --llama / --vit


def _param_dtype(m: ml_collections.ConfigDict):
  import jax.numpy as jnp

  return jnp.dtype(m.param_dtype)


def import_official(state: Mapping, m: ml_collections.ConfigDict,
                    expected: dict[str, tuple]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(flat params in `model.param_dtype`, notes); every key accounted for."""
  notes = []
  directory = getattr(state, "directory", None)
  config_file = pathlib.Path(directory) / "config.json" if directory else None
  if config_file is not None and config_file.exists():
    theirs = official.model_config_from_official(json.loads(config_file.read_text()))
    mismatch = official.architecture_mismatch(m, theirs)
    if mismatch:
      raise ConversionError(f"{config_file} describes another architecture than config.model "
                            f"({mismatch}; ours vs the checkpoint's)")
    notes.append(f"{config_file}: same architecture as config.model")
  flat = official.to_flax(state, m, expected, dtype=_param_dtype(m))
  notes.append(f"{official.check_buffers(state, m)} buffers present and equal to ours")
  return flat, notes


def shard_of(m: ml_collections.ConfigDict):
  """Official sharding: LLM layer i -> shard i, everything else -> the last shard."""
  layers = m.llm.layers

  def shard(key: str) -> int:
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else layers

  return shard, layers + 1


def write_official(flat: dict[str, np.ndarray], m: ml_collections.ConfigDict, out: str,
                   reference: Mapping | None = None) -> list[str]:
  """Writes every official key (strict-loadable by the official model) to `out`: an HF
  directory streamed shard by shard, or one .safetensors file; returns notes."""
  path = pathlib.Path(out)
  dtype = str(np.dtype(next(iter(flat.values())).dtype))
  if path.suffix == ".safetensors":
    state = official.to_official(flat, m, reference)
    checkpoints.write_state_dict(state, path)
    return [f"{len(state)} official keys in {path}"]
  shard, count = shard_of(m)
  keys = sorted(official.layout(m), key=shard)  # stable: official order within a shard
  weight_map = checkpoints.write_sharded(official.official_tensors(flat, m, reference, keys),
                                         path, shard, count)
  config = official.official_config(m, dtype={"bfloat16": "bfloat16", "float16": "float16"}
                                    .get(dtype, "float32"))
  (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  return [f"{len(weight_map)} official keys in {count} shards + index + config.json in {path}"]


def init_pretrained(fresh: dict[str, np.ndarray], m: ml_collections.ConfigDict,
                    sources: dict[str, Mapping | None], positional_embedding: str = "resized"
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(flat params, notes): fresh parameters with LLaMA-2 and/or CLIP weights imported."""
  if positional_embedding != "resized":
    raise ConversionError(f"--positional_embedding={positional_embedding}: Owl2 always "
                          "resizes CLIP's table")
  return pretrained.initialise(fresh, m, llama=sources.get("llama"), vit=sources.get("vit"))


__all__ = ["ConversionError", "INIT_SOURCES", "import_official", "write_official", "init_pretrained", "shard_of"]
