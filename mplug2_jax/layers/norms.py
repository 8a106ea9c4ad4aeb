"""`Norm`: the one normalisation layer, LayerNorm (CLIP, BERT, abstractor) or RMSNorm
(LLaMA)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug2_jax.layers.axes import param_init

NORM_KINDS = ("layernorm", "rmsnorm")


class Norm(nn.Module):
  """LayerNorm (`kind="layernorm"`, gain and bias) or RMSNorm (gain only).

  Statistics are float32 and the variance two-pass (`mean((x - mean)^2)`, as PyTorch), so
  float32 outputs match the reference implementations to rounding; the result is cast
  back to the compute dtype.
  """

  eps: float
  kind: str = "layernorm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", param_init(nn.initializers.ones_init(), ("norm",)),
                       (width,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if self.kind == "layernorm":
      bias = self.param("bias", param_init(nn.initializers.zeros_init(), ("norm",)),
                        (width,), self.param_dtype)
      centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
      y = centred * jax.lax.rsqrt(var + self.eps)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    elif self.kind == "rmsnorm":
      var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
      y = xf * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    else:
      raise ValueError(f"unknown norm kind {self.kind!r}; known: {NORM_KINDS}")
    return y.astype(self.dtype)
