"""Per-modality copies of a module, chosen per token (mPLUG-Owl2's modality-adaptive
module: separate norms and key/value projections for text and image tokens).

`multiway(cls, num)` is `cls` with its parameters stacked `num` times on a leading
"modality" axis; calling it runs every copy and returns the stacked outputs, and
`select(outputs, modality)` keeps, for each token, its own modality's copy. Running every
copy on every token and selecting is exact and costs one extra application per copy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def multiway(cls: type[nn.Module], num: int) -> type[nn.Module]:
  """`cls` with `num` copies of its parameters (leading logical axis "modality")."""
  return nn.vmap(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=None, out_axes=0, axis_size=num,
                 metadata_params={nn.PARTITION_NAME: "modality"})


def select(stacked: jax.Array, modality: jax.Array | None) -> jax.Array:
  """(M, B, T, ...) outputs of M copies -> (B, T, ...) with copy `modality[b, t]` per
  token; `modality=None` takes copy 0 everywhere (a text-only sequence)."""
  if modality is None:
    return stacked[0]
  out = stacked[0]
  expand = (1,) * (out.ndim - modality.ndim)
  for m in range(1, stacked.shape[0]):
    out = jnp.where((modality == m).reshape(modality.shape + expand), stacked[m], out)
  return out
