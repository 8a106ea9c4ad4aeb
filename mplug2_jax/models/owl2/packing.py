"""Packed rows for mPLUG-Owl2: several conversations in one row, kept apart.

A packed batch carries `segment_ids` (B, L) int32: 1, 2, ... for the conversations of a row
in order, 0 on padding (the host packer is `data/instruction.py` `pack`). In the spliced
sequence every image token takes its placeholder's segment. Then:

  attention   causal, and a query sees only keys of its own segment (never padding)
  positions   restart at 0 at every segment start, so each conversation gets the RoPE
              positions it has alone
  loss        unchanged: labels are -100 across segment joins already (each
              conversation's first token is a masked BOS), so the mean over the batch's
              targets is the one of the unpacked batch

The image slots of a row are filled in placeholder order across its segments.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mplug2_jax.tokens import IMAGE_TOKEN_INDEX

Array = Any


def expand(input_ids: Array, values: Array, per_image: int, out_length: int) -> Array:
  """Per input token values (B, L) -> per spliced position (B, out_length): an image
  placeholder's value repeated over its `per_image` tokens, 0 past the row's tokens
  (the index arithmetic of `model.splice`)."""
  length = input_ids.shape[1]
  width = jnp.where(input_ids == IMAGE_TOKEN_INDEX, per_image, 1)
  ends = jnp.cumsum(width, axis=1)
  p = jnp.arange(out_length)
  src = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends)
  taken = jnp.take_along_axis(values, jnp.minimum(src, length - 1), axis=1)
  return jnp.where(src < length, taken, 0)


def positions(segments: Array) -> Array:
  """(B, P) segment ids -> positions counted from each segment's first token."""
  idx = jnp.arange(segments.shape[1])
  start = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                           segments[:, 1:] != segments[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(start, idx[None], 0), axis=1)
  return (idx[None] - first).astype(jnp.int32)


def attention_mask(segments: Array) -> Array:
  """(B, P) segment ids -> boolean (B, 1, P, P): causal, same segment, no padding."""
  length = segments.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same = segments[:, :, None] == segments[:, None, :]
  return (causal[None] & same & (segments[:, None, :] > 0))[:, None]
