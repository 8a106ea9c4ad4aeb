"""`Dense`: a linear layer over the last dims, with logical axes on its parameters."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug2_jax.layers.axes import param_init

Array = jax.Array
DType = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)  # BERT / LLaMA initializer_range


def torch_default_init(fan_in: int) -> Callable:
  """PyTorch's default Linear/Conv init for weights and biases: U(-1/sqrt(fan_in), +)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
  """Linear layer contracting the last `in_dims` input dims.

  The kernel has shape `x.shape[-in_dims:] + features` and `kernel_axes` names all of its
  dims, so attention projections can be (embed, heads, kv) and (heads, kv, embed) and a
  tensor-parallel axis can split heads without reshapes.
  """

  features: int | tuple[int, ...]
  kernel_axes: tuple[str, ...]
  in_dims: int = 1
  use_bias: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    kernel = self.param("kernel", param_init(self.kernel_init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_dims)
    if self.use_bias:
      bias = self.param("bias", param_init(self.bias_init, self.kernel_axes[-len(features):]),
                        features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
