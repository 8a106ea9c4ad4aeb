"""`Mlp`: the one feed-forward block, plain or gated, with options."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mplug2_jax.layers.activations import activation
from mplug2_jax.layers.axes import constrain
from mplug2_jax.layers.linear import Dense, default_kernel_init
from mplug2_jax.layers.norms import Norm


class Mlp(nn.Module):
  """`wo(act(wi(x)))`, or gated `wo(act(gate(x)) * wi(x))` (SwiGLU with act="silu").

  `inner_norm_eps > 0` adds a LayerNorm over the hidden width before `wo` (the mPLUG-Owl2
  abstractor's `ffn_ln`). The hidden activation is tagged "mlp_hidden" for remat policies.
  """

  hidden: int
  out_features: int
  act: str = "gelu"
  gated: bool = False
  use_bias: bool = True
  inner_norm_eps: float = 0.0
  kernel_init: Callable = default_kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(Dense, use_bias=self.use_bias, kernel_init=self.kernel_init,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, kernel_axes=("embed", "mlp"), name="wi")(x)
    if self.gated:
      gate = dense(self.hidden, kernel_axes=("embed", "mlp"), name="gate")(x)
      h = activation(self.act)(gate) * h
    else:
      h = activation(self.act)(h)
    h = constrain(checkpoint_name(h, "mlp_hidden"),
                  ("activation_batch", "activation_length", "activation_mlp"))
    if self.inner_norm_eps:
      h = Norm(self.inner_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
               name="inner_norm")(h)
    return dense(self.out_features, kernel_axes=("mlp", "embed"), name="wo")(h)
