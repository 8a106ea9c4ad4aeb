"""Shared building blocks for every tower: dense, norm, attention, MLP, layer stacks.

Every model family in this package (the CLIP video ViT, the BERT text towers of mPLUG-2,
and later the LLaMA decoder and visual abstractor of mPLUG-Owl2) is assembled from the
pieces in this file, so that there is exactly one attention, one MLP and one norm.

Conventions:
  * Every parameter carries logical axis names (`nn.with_logical_partitioning`); the
    single rules table in `mplug2_jax/config_lib.py` maps them onto mesh axes.
  * Activations are constrained at block boundaries with logical names
    (`activation_batch`, `activation_length`, `activation_embed`).
  * `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

# Logical axis names used by parameters. The rules table must cover every one of them.
PARAM_AXES = (
    "embed",        # model width of a tower
    "mlp",          # hidden width of an MLP, bottleneck width of a temporal adapter
    "heads",        # attention heads
    "kv",           # width of one attention head
    "vocab",        # vocabulary
    "layers",       # stacked (scanned) layers
    "norm",         # norm gains / biases
    "position",     # position-embedding rows
    "latents",      # learnable query rows
    "conv_time",    # temporal kernel taps of a convolution
    "conv_height",  # spatial kernel taps of a convolution
    "conv_width",
    "conv_in",      # input channels of the patch convolution
    "classes",      # classifier outputs, ITC projection width
)
# Logical axis names used by activation sharding constraints.
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


def constrain(x: Array, axes: Sequence[str | None] = BATCH_LENGTH_EMBED) -> Array:
  """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(axes))


def param_init(init: Callable, axes: Sequence[str]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


default_kernel_init = nn.initializers.normal(stddev=0.02)  # BERT / HF initializer_range


def torch_default_init(fan_in: int) -> Callable:
  """PyTorch's default Linear/Conv init for weights and biases: U(-1/sqrt(fan_in), +)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# --------------------------------------------------------------------------------------
# Dense and norm.
# --------------------------------------------------------------------------------------


class Dense(nn.Module):
  """Linear layer contracting the last `in_dims` input dims; parameters carry logical axes.

  The kernel has shape `x.shape[-in_dims:] + features` and `kernel_axes` names all of its
  dims (so attention projections can be (embed, heads, kv) and (heads, kv, embed)).
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


class Norm(nn.Module):
  """The one normalisation helper: LayerNorm (CLIP, BERT) or RMSNorm (LLaMA).

  Statistics are computed in float32 with the two-pass variance (as PyTorch does), so
  that float32 outputs match the reference implementations to rounding.
  """

  eps: float
  kind: str = "layernorm"  # "layernorm" | "rmsnorm"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    scale = self.param("scale", param_init(nn.initializers.ones_init(), ("norm",)),
                       (width,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if self.kind == "layernorm":
      bias = self.param("bias", param_init(nn.initializers.zeros_init(), ("norm",)),
                        (width,), self.param_dtype)
      mean = jnp.mean(xf, axis=-1, keepdims=True)
      centred = xf - mean
      var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
      y = centred * jax.lax.rsqrt(var + self.eps)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    elif self.kind == "rmsnorm":
      var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
      y = xf * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    else:
      raise ValueError(f"unknown norm kind {self.kind!r}")
    return y.astype(self.dtype)


# --------------------------------------------------------------------------------------
# Activations.
# --------------------------------------------------------------------------------------


def quick_gelu(x: Array) -> Array:
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # BERT "gelu" = erf GELU
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# --------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "explicit", "chunked", "auto")
ATTENTION_CHUNK = 512  # queries per block of the "chunked" implementation


def resolve_attention(implementation: str, dtype) -> str:
  """The implementation `attention_op` runs for a configured one.

  "auto": cuDNN (flash attention) on GPU for bf16/fp16; on CPU the explicit formulation,
  because XLA:CPU runs its batched matmuls with the batch and head axes leading about 1.5x
  faster than `jax.nn.dot_product_attention`'s (B, T, N, H) contractions (forward +
  backward, measured in docs/performance.md); elsewhere (TPU) "chunked", which is the
  explicit formulation up to ATTENTION_CHUNK queries and keeps the probabilities of longer
  sequences (the 4,097 visual tokens of 16 frames) out of memory.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "explicit" if backend == "cpu" else "chunked"


def attention_op(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    implementation: str = "xla",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
  """Scaled dot-product attention, (B, T, N, H) x (B, S, N, H) -> (B, T, N, H).

  `mask` is boolean, broadcastable to (B, N, T, S), True where a query may attend.
  The softmax scale is 1/sqrt(H); logits and softmax are float32 whatever the compute dtype.
  "xla" / "cudnn" call `jax.nn.dot_product_attention`; "explicit" writes softmax(QK^T)V out
  in (B, N, T, H) layout; "chunked" runs it over blocks of ATTENTION_CHUNK queries, each
  recomputed in the backward pass (long sequences without a fused kernel). Attention-
  probability dropout (BERT fine-tuning) needs the probabilities materialised, so with
  dropout "xla" and "cudnn" take the explicit formulation.
  """
  impl = resolve_attention(implementation, query.dtype)
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  if impl in ("xla", "cudnn") and not dropout:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=impl)
  if impl == "chunked" and query.shape[1] > ATTENTION_CHUNK:
    return _chunked_attention(query, key, value, mask, dropout_rate if dropout else 0.0,
                              dropout_rng)
  return _explicit_attention(query, key, value, mask, dropout_rate if dropout else 0.0,
                             dropout_rng)


def _explicit_attention(query, key, value, mask, dropout_rate, dropout_rng):
  """softmax(Q K^T / sqrt(H)) V written out, with optional probability dropout."""
  # Heads next to the batch axis: the two matmuls become plain batched GEMMs. The query is
  # scaled before the product (exact for power-of-two head sizes), so no logits-sized
  # tensor of the constant is ever materialised.
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
  q = q * jnp.asarray(query.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bnts,bnsh->bnth", probs.astype(value.dtype), v)
  return out.transpose(0, 2, 1, 3)


def _chunked_attention(query, key, value, mask, dropout_rate, dropout_rng):
  """The explicit formulation over blocks of ATTENTION_CHUNK queries, each block
  rematerialised in the backward pass: memory O(chunk x S) per head instead of O(T x S).

  The XLA path for long sequences where no fused kernel compiles (the 4,097 visual tokens
  of 16 frames at 224 px: one (B, N, T, S) float32 tensor is 4.3 GB at batch 4 with 16
  heads); on GPU "cudnn" and on TPU a Pallas kernel avoid the materialisation instead.
  Dropout draws per block from fold_in(rng, block), so its mask differs from "explicit".
  """
  b, t, n, h = query.shape
  chunk = ATTENTION_CHUNK
  blocks = -(-t // chunk)
  pad = blocks * chunk - t
  q = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q = q.reshape(b, blocks, chunk, n, h).swapaxes(0, 1)            # (blocks, B, C, N, H)
  xs = {"query": q, "index": jnp.arange(blocks)}
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[2] > 1:  # differs per query: each block gets its rows (else shared)
      rows = jnp.pad(jnp.broadcast_to(mask, mask.shape[:2] + (t, mask.shape[3])),
                     ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
      rows = rows.reshape(mask.shape[:2] + (blocks, chunk, mask.shape[3]))
      xs["mask"] = jnp.moveaxis(rows, 2, 0)                       # (blocks, B|1, N|1, C, S)
  rng = dropout_rng if dropout_rate > 0.0 else jax.random.key(0)

  @jax.checkpoint
  def block(x):
    return _explicit_attention(x["query"], key, value, x.get("mask", mask), dropout_rate,
                               jax.random.fold_in(rng, x["index"]))

  _, out = jax.lax.scan(lambda carry, x: (carry, block(x)), None, xs)
  out = out.swapaxes(0, 1).reshape(b, blocks * chunk, n, h)
  return out[:, :t]


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v projections and an output projection.

  Used for self-attention (`inputs_kv=None`) and cross-attention. Returns the output
  projection only: residuals and norms belong to the block, since BERT (post-norm),
  CLIP (pre-norm) and LLaMA place them differently.

  Incremental decoding (`cache`): the first call with a "cache" collection that does not
  exist yet primes it (a full-length dummy input for "self", the real encoder states for
  "cross"); later calls feed one new query position each.
    "self"   keys/values of past positions are kept and the new one written at `index`;
             the query attends to positions <= index (the causal mask of a full pass).
    "cross"  the encoder keys/values are projected once, at priming, and reused.
  """

  num_heads: int
  head_dim: int
  out_features: int
  use_bias: bool = True
  implementation: str = "xla"
  dropout_rate: float = 0.0
  cache: str = "none"  # "none" | "self" | "cross"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None,
               mask: Array | None = None, deterministic: bool = True) -> Array:
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    proj = functools.partial(Dense, features=(self.num_heads, self.head_dim),
                             kernel_axes=("embed", "heads", "kv"), use_bias=self.use_bias,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    heads = ("activation_batch", "activation_length", "activation_heads", None)
    q = constrain(proj(name="query")(inputs_q), heads)
    priming = self.cache != "none" and not self.has_variable("cache", "cached_key")
    if self.cache == "cross" and not priming:
      k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    else:
      k = constrain(proj(name="key")(inputs_kv), heads)
      v = constrain(proj(name="value")(inputs_kv), heads)
    if self.cache != "none":
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      if self.cache == "cross" and priming:
        cached_k.value, cached_v.value = k, v
      if self.cache == "self":
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not priming:
          i = index.value
          cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k, i, axis=1)
          cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v, i, axis=1)
          k, v = cached_k.value, cached_v.value
          mask = (jnp.arange(k.shape[1]) <= i)[None, None, None, :]
          index.value = i + q.shape[1]
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    ctx = attention_op(q, k, v, mask, implementation=self.implementation,
                       dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
    return Dense(self.out_features, kernel_axes=("heads", "kv", "embed"), in_dims=2,
                 use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(ctx)


def padding_mask(key_mask: Array) -> Array:
  """(B, S) 1/0 key mask -> boolean (B, 1, 1, S)."""
  return key_mask.astype(bool)[:, None, None, :]


def causal_padding_mask(key_mask: Array) -> Array:
  """(B, S) key mask -> boolean (B, 1, S, S): causal and not padding."""
  length = key_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None, None] & padding_mask(key_mask)


# --------------------------------------------------------------------------------------
# MLP.
# --------------------------------------------------------------------------------------


class Mlp(nn.Module):
  """The one MLP: `wo(act(wi(x)))`, or `wo(act(gate(x)) * wi(x))` when gated (LLaMA)."""

  hidden: int
  out_features: int
  act: str = "gelu"
  gated: bool = False
  use_bias: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(Dense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    h = dense(self.hidden, kernel_axes=("embed", "mlp"), name="wi")(x)
    if self.gated:
      gate = dense(self.hidden, kernel_axes=("embed", "mlp"), name="gate")(x)
      h = activation(self.act)(gate) * h
    else:
      h = activation(self.act)(h)
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(self.out_features, kernel_axes=("mlp", "embed"), name="wo")(h)


# --------------------------------------------------------------------------------------
# Layer stacks: scan + remat.
# --------------------------------------------------------------------------------------

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: fastest, most memory
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything: least memory
}


def stack(block: type[nn.Module], length: int, remat_policy: str,
          broadcast_args: int) -> type[nn.Module]:
  """Wraps `block` in remat (named policy) and `nn.scan` over `length` layers.

  The block's call signature is `(carry, *broadcast) -> (carry, per_layer_output)`;
  parameters are stacked on a leading "layers" axis.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {remat_policy!r} not in {sorted(REMAT_POLICIES)}")
  if remat_policy != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=False,
                     static_argnums=())
  return nn.scan(
      block,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * broadcast_args,
      length=length,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


def runs(kinds: Sequence[Any]) -> list[tuple[Any, int, int]]:
  """Groups consecutive equal kinds: ['a','a','b','a'] -> [('a',0,2), ('b',2,1), ('a',3,1)]."""
  out: list[tuple[Any, int, int]] = []
  for i, kind in enumerate(kinds):
    if out and out[-1][0] == kind:
      out[-1] = (kind, out[-1][1], out[-1][2] + 1)
    else:
      out.append((kind, i, 1))
  return out
