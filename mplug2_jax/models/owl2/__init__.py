"""The mPLUG-Owl2 family (arXiv 2311.04257): what the registry hands out.

  config.py      size presets (`tiny` = the golden tiny_a, `7b`), `model_config`, `validate`
  schema.py      `batch_schema`: ids with image placeholders, image slots per sample
  model.py       the composite `Owl2` (shared CLIP ViT, abstractor, LLaMA), `splice`, `build`
  abstractor.py  the visual abstractor
  llama.py       LLaMA-2 decoder with the modality-adaptive module
  objectives.py  the language-model loss
  generation.py  prefill + cached decoding (greedy / sampling, stop rules, right batching)
  predict.py     jitted generation for the chat CLI and evaluators
  flops.py       analytic FLOPs of a train step

Conversion to and from the official HF checkpoint and LLaMA-2 import: `convert/owl2/`.
"""

from __future__ import annotations

import ml_collections

from mplug2_jax.models import schema as schema_lib
from mplug2_jax.models.owl2 import generation, objectives, predict
from mplug2_jax.models.owl2.config import (SIZES, TASK_MODULES, TASKS, model_config,
                                           tokens_per_image, validate)
from mplug2_jax.models.owl2.flops import train_step_flops
from mplug2_jax.models.owl2.model import Owl2, build, splice
from mplug2_jax.models.owl2.schema import batch_schema, check_images, expanded_length

NAME = "owl2"
CONVERSION = "mplug2_jax.convert.owl2"  # imported by name: convert sits above models
DEFAULT_TOKENIZER = "sentencepiece"

__all__ = ["NAME", "CONVERSION", "SIZES", "TASKS", "TASK_MODULES", "model_config",
           "validate", "batch_schema", "init_batch", "build", "Owl2", "splice", "objectives",
           "predict", "generation", "train_step_flops", "synthetic_batch", "check_images",
           "expanded_length", "tokens_per_image"]

# Lengths of the stand-in batch that parameter init traces (parameters do not depend on
# the batch or sequence sizes).
_INIT_LENGTHS = ml_collections.ConfigDict(dict(task="", max_length=4, images_per_sample=1,
                                               image_size=0))


def init_batch(model_cfg: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
  """A zero batch for parameter init and `eval_shape`."""
  return schema_lib.zeros(batch_schema(model_cfg, _INIT_LENGTHS, batch_size))


def synthetic_batch(model_cfg: ml_collections.ConfigDict, schema: dict, rng,
                    full_length: bool = False) -> dict:
  """Random host arrays of `schema`: BOS, text with image placeholders, labels."""
  from mplug2_jax.models.owl2 import schema as owl2_schema

  return owl2_schema.synthetic(model_cfg, schema, rng, full_length=full_length)
