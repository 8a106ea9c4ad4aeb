"""Task losses of mPLUG-2 (spec section 6), written to match the official reductions.

All decoder losses compare `logits[:, :-1]` with `labels[:, 1:]` (position t scores token
t+1); label -100 marks ignored positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def shifted_token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy (N, L-1) and validity (N, L-1) of the shifted targets."""
  logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
  valid = targets != IGNORE
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(valid, -picked, 0.0), valid


def caption_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean token cross-entropy over every non-ignored target of the batch
  (`BertPrefixModel`: `CrossEntropyLoss()` default mean, whatever the caller asks)."""
  losses, valid = shifted_token_losses(logits, labels)
  return losses.sum() / jnp.maximum(valid.sum(), 1)


def answer_sequence_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per answer row, the summed token cross-entropy (`BertLMHeadModel`, reduction none)."""
  losses, _ = shifted_token_losses(logits, labels)
  return losses.sum(axis=-1)


def answer_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                num_questions: int) -> jax.Array:
  """VideoQA: sum_j weights_j * s_j / B (B = number of questions)."""
  return jnp.sum(weights * answer_sequence_losses(logits, labels)) / num_questions
