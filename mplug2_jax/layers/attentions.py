"""`MultiHeadAttention`: query/key/value/output projections around `attention_op`.

Used for self- and cross-attention by every tower. It returns the output projection
only: residuals and norms belong to the block, since post-norm BERT, pre-norm CLIP and
LLaMA place them differently. Options the towers need:

  num_kv_heads     grouped-query attention (fewer key/value heads; default = num_heads)
  rope_theta       rotary embeddings on queries and keys (> 0), at the given `positions`
  num_modalities   per-modality key/value projections (> 1), chosen per token by
                   `modality` (mPLUG-Owl2); query and output projections stay shared
  cache            "self": a key/value cache for incremental decoding; "cross": encoder
                   keys/values projected once and reused

Projections are tagged with `checkpoint_name` ("query_proj", "key_proj", "value_proj",
"attention_out", "out_proj") so remat policies can name what they keep (`stack.py`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mplug2_jax.layers import multiway as multiway_lib
from mplug2_jax.layers.attention_op import attention_op
from mplug2_jax.layers.axes import BATCH_LENGTH_HEADS, constrain
from mplug2_jax.layers.embeddings import apply_rope
from mplug2_jax.layers.linear import Dense, default_kernel_init

Array = jax.Array

CACHE_MODES = ("none", "self", "cross")


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v projections and an output projection.

  Key/value cache (`cache`): the first call in a "cache" collection that does not exist
  yet primes it and attends as without a cache ("self": give a full-length input, which
  sizes the cache; "cross": give the real encoder states, whose keys/values are kept).
  Later "self" calls write their T keys/values at `cache_index` and attend to every
  cached position up to their own (query row r of a call at index i sees positions
  <= i + r), restricted further by `cache_mask` (B, S_cache) when given (padding).
  """

  num_heads: int
  head_dim: int
  out_features: int
  num_kv_heads: int | None = None
  use_bias: bool = True
  rope_theta: float = 0.0
  num_modalities: int = 1
  implementation: str = "xla"
  dropout_rate: float = 0.0
  cache: str = "none"
  kernel_init: Callable = default_kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None,
               mask: Array | None = None, deterministic: bool = True, *,
               positions: Array | None = None, modality: Array | None = None,
               inputs_k: Array | None = None, cache_mask: Array | None = None) -> Array:
    """`inputs_k`: the keys' projection input when it differs from the values' (the
    abstractor adds positions to the key input only); `positions` (B, T) for RoPE (the
    same for queries and keys: self-attention); `modality` (B, S) for per-modality
    key/value projections."""
    if self.cache not in CACHE_MODES:
      raise ValueError(f"cache {self.cache!r} not in {CACHE_MODES}")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    inputs_k = inputs_kv if inputs_k is None else inputs_k
    kv_heads = self.num_kv_heads or self.num_heads
    kw = dict(use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype,
              param_dtype=self.param_dtype)
    query = Dense((self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
                  name="query", **kw)
    kv_proj = functools.partial(Dense, (kv_heads, self.head_dim),
                                kernel_axes=("embed", "kv_heads", "kv"), **kw)
    if self.num_modalities > 1:
      kv_proj = functools.partial(multiway_lib.multiway(Dense, self.num_modalities),
                                  (kv_heads, self.head_dim),
                                  kernel_axes=("embed", "kv_heads", "kv"), **kw)

    def project_kv(name, x):
      y = kv_proj(name=name)(x)
      return multiway_lib.select(y, modality) if self.num_modalities > 1 else y

    q = constrain(checkpoint_name(query(inputs_q), "query_proj"), BATCH_LENGTH_HEADS)
    priming = self.cache != "none" and not self.has_variable("cache", "cached_key")
    if self.cache == "cross" and not priming:
      k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    else:
      k = constrain(checkpoint_name(project_kv("key", inputs_k), "key_proj"), BATCH_LENGTH_HEADS)
      v = constrain(checkpoint_name(project_kv("value", inputs_kv), "value_proj"),
                    BATCH_LENGTH_HEADS)
      if self.rope_theta:
        if positions is None:
          positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
    if self.cache != "none":
      k, v, mask = self._use_cache(k, v, mask, priming, q.shape[1], cache_mask)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    ctx = attention_op(q, k, v, mask, implementation=self.implementation,
                       dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
    ctx = checkpoint_name(ctx, "attention_out")
    out = Dense(self.out_features, kernel_axes=("heads", "kv", "embed"), in_dims=2,
                name="out", **kw)(ctx)
    return checkpoint_name(out, "out_proj")

  def _use_cache(self, k, v, mask, priming, length, cache_mask):
    """Cached keys/values (and the mask over them) for this call; see the class doc."""
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if self.cache == "cross":
      if priming:
        cached_k.value, cached_v.value = k, v
      return k, v, mask
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if priming:
      return k, v, mask
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k, i, axis=1)
    cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v, i, axis=1)
    index.value = i + length
    slots = jnp.arange(cached_k.value.shape[1])
    mask = (slots[None, :] <= i + jnp.arange(length)[:, None])[None, None]    # (1,1,T,S)
    if cache_mask is not None:
      mask = mask & cache_mask.astype(bool)[:, None, None, :]
    return cached_k.value, cached_v.value, mask
