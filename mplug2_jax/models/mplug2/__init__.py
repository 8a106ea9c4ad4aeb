"""The mPLUG-2 family (ICML 2023, arXiv 2302.00402): what the registry hands out.

  config.py      size presets, `model_config(size, task)`, `validate`, TASKS, TASK_MODULES
  schema.py      `batch_schema`: every batch array of every task
  model.py       the composite `Mplug2` (CLIP video ViT + BERT towers), `build`
  bert.py        text encoder with universal layers, fusion model, decoder
  objectives.py  the task losses, momentum model and ITC queues
  generation.py  the official beam search, greedy decoding, answer ranking
  predict.py     inference for the evaluators
  flops.py       analytic FLOPs of a train step

Conversion to and from the official PyTorch checkpoints: `convert/mplug2/`.
"""

from __future__ import annotations

import ml_collections

from mplug2_jax.models import schema as schema_lib
from mplug2_jax.models.mplug2 import objectives, predict
from mplug2_jax.models.mplug2.config import (SIZES, TASK_MODULES, TASKS, model_config,
                                             validate)
from mplug2_jax.models.mplug2.flops import train_step_flops
from mplug2_jax.models.mplug2.model import Mplug2, answer_encoder_states, build
from mplug2_jax.models.mplug2.schema import batch_schema
from mplug2_jax.tokens import BERT_CLS_ID, BERT_FIRST_WORD_ID

NAME = "mplug2"
CONVERSION = "mplug2_jax.convert.mplug2"  # imported by name: convert sits above models
DEFAULT_TOKENIZER = "wordpiece"

__all__ = ["NAME", "CONVERSION", "SIZES", "TASKS", "TASK_MODULES", "model_config",
           "validate", "batch_schema", "init_batch", "build", "Mplug2", "answer_encoder_states", "objectives",
           "predict", "train_step_flops", "synthetic_batch"]

# Lengths of the stand-in batch that parameter init traces (parameters do not depend on
# batch or sequence sizes; any length up to the position tables works).
_INIT_LENGTHS = ml_collections.ConfigDict(dict(
    task="", num_frames=0, image_size=0, max_caption_len=8, max_question_len=8,
    max_answer_len=8, answers_per_question=1, max_text_len=8))


def init_batch(model_cfg: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
  """A zero batch of `model_cfg.task` for parameter init and `eval_shape`."""
  return schema_lib.zeros(batch_schema(model_cfg, _INIT_LENGTHS, batch_size))


def synthetic_batch(model_cfg: ml_collections.ConfigDict, schema: dict, rng,
                    full_length: bool = False) -> dict:
  """Random host arrays of `schema` with plausible values (BERT ids, [CLS] first)."""
  return schema_lib.synthetic(schema, rng, vocab_size=model_cfg.text.vocab_size,
                              start_id=BERT_CLS_ID, first_word_id=BERT_FIRST_WORD_ID,
                              num_classes=model_cfg.num_classes, full_length=full_length)
