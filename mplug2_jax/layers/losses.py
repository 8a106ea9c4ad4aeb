"""Token cross-entropies with the reductions the official models use.

Decoder losses compare `logits[:, :-1]` with `labels[:, 1:]` (position t scores token t+1);
the label `IGNORE_INDEX` (-100) marks positions without loss. Logits are float32 here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mplug2_jax.tokens import IGNORE_INDEX


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position cross-entropy and validity (no shift)."""
  valid = labels != IGNORE_INDEX
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(valid, -picked, 0.0), valid


def shifted_token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy (N, L-1) and validity (N, L-1) of the shifted targets."""
  return token_losses(logits[:, :-1], labels[:, 1:])


def shifted_mean_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over every non-ignored shifted target of the batch (PyTorch `CrossEntropyLoss`
  with its default mean: mPLUG-2 captioning, LLaMA / mPLUG-Owl2)."""
  losses, valid = shifted_token_losses(logits, labels)
  return losses.sum() / jnp.maximum(valid.sum(), 1)


def shifted_sequence_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per row, the summed shifted token cross-entropy (reduction "none", then summed)."""
  losses, _ = shifted_token_losses(logits, labels)
  return losses.sum(axis=-1)


def token_mean_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over positions with a label (no shift: masked LM)."""
  losses, valid = token_losses(logits, labels)
  return losses.sum() / jnp.maximum(valid.sum(), 1)
