"""Logical axis names and activation sharding constraints.

Every parameter carries logical axis names (`param_init`); the one rules table
(`config_lib.DEFAULT_RULES`) maps them onto the mesh axes. Activations are constrained at
block boundaries by logical names (`constrain`), which does nothing outside a rules context.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

# Logical axis names of parameters. The rules table must cover every one of them.
PARAM_AXES = (
    "embed",        # model width of a tower
    "mlp",          # hidden width of an MLP, bottleneck width of a temporal adapter
    "heads",        # attention (query) heads
    "kv_heads",     # key/value heads (grouped-query attention: fewer than "heads")
    "kv",           # width of one attention head
    "vocab",        # vocabulary
    "layers",       # stacked (scanned) layers
    "modality",     # per-modality copies of a weight (mPLUG-Owl2 multiway)
    "norm",         # norm gains / biases
    "position",     # position-embedding rows
    "latents",      # learnable query rows
    "conv_time",    # temporal kernel taps of a convolution
    "conv_height",  # spatial kernel taps of a convolution
    "conv_width",
    "conv_in",      # input channels of the patch convolution
    "classes",      # classifier outputs, ITC projection width
)
# Logical axis names of activation sharding constraints.
ACTIVATION_AXES = (
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_heads",
    "activation_mlp",
    "activation_vocab",
)
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS = ("activation_batch", "activation_length", "activation_heads", None)


def constrain(x: jax.Array, axes: Sequence[str | None] = BATCH_LENGTH_EMBED) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(axes))


def param_init(init: Callable, axes: Sequence[str]) -> Callable:
  """`init` whose parameter carries the logical `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))
