"""mPLUG-Owl2 training objective: the language-model loss (`owl2.md` §4.8).

Logits at position t score the spliced label at t + 1 (-100 on image tokens, prompt and
padding); the loss is the mean over every non-ignored target of the whole batch (not per
sample), as the official `CrossEntropyLoss()`. Nothing is kept between steps: the extra
state of the generic train step (`train/step.py`) is `{}` and its hooks pass it through.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import losses

Array = Any


def default_config() -> ml_collections.ConfigDict:
  """`config.objective`: Owl2 has one loss and no settings."""
  return ml_collections.ConfigDict()


def lm_loss(logits: Array, labels: Array) -> Array:
  """Mean next-token cross-entropy over the batch's labelled targets."""
  return losses.shifted_mean_loss(logits, labels)


def loss(model, params, extra: dict, batch: dict, rng, c: ml_collections.ConfigDict):
  """(loss, (metrics, enqueued=None)) for one (micro-)batch."""
  del extra, c
  out, _ = model.apply({"params": params}, batch, rngs={"dropout": rng})
  value = lm_loss(out["logits"], out["labels"])
  targets = jnp.sum(out["labels"][:, 1:] != -100)
  return value, ({"loss": value, "loss/lm": value, "targets": targets}, None)


def init_extra(rng, params: dict, model_cfg: ml_collections.ConfigDict,
               c: ml_collections.ConfigDict) -> dict:
  del rng, params, model_cfg, c
  return {}


def reset_momentum(extra: dict, params: dict) -> dict:
  del params
  return extra


def before_update(extra: dict, params: dict, c: ml_collections.ConfigDict) -> dict:
  del params, c
  return extra


def after_update(extra: dict, enqueued: dict | None) -> dict:
  del enqueued
  return extra
