"""The attention computation: softmax(Q K^T / sqrt(H)) V over projected heads.

One dispatcher (`attention_op`) keyed by the config's `attention` value, as MaxText's
`attention_op.py`; the projections around it are `attentions.MultiHeadAttention`.

  "xla" / "cudnn"  `jax.nn.dot_product_attention` with that implementation
  "explicit"       softmax(QK^T)V written out with the heads next to the batch axis
                   (XLA:CPU runs those batched GEMMs faster; docs/performance.md)
  "chunked"        the explicit form over blocks of ATTENTION_CHUNK queries, each block
                   rematerialised in the backward pass: O(chunk x S) memory for long
                   visual sequences where no fused kernel compiles
  "auto"           cuDNN on GPU for bf16/fp16, explicit on CPU, chunked elsewhere (TPU)

Queries may have more heads than keys/values (grouped-query attention): each key/value
head serves `num_heads / num_kv_heads` consecutive query heads. Masks are boolean, True
where a query may attend, broadcastable to (B, N, T, S).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "explicit", "chunked", "auto")
ATTENTION_CHUNK = 512  # queries per block of the "chunked" implementation


def resolve_attention(implementation: str, dtype) -> str:
  """The implementation `attention_op` runs for a configured one ("auto" resolved)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "explicit" if backend == "cpu" else "chunked"


def attention_op(query: Array, key: Array, value: Array, mask: Array | None = None, *,
                 implementation: str = "xla", dropout_rate: float = 0.0,
                 dropout_rng: Array | None = None) -> Array:
  """(B, T, N, H) x (B, S, K, H) x (B, S, K, H) -> (B, T, N, H), N a multiple of K.

  Logits and softmax are float32 whatever the compute dtype. Attention-probability
  dropout (BERT fine-tuning) needs the probabilities materialised, so with dropout "xla"
  and "cudnn" take the explicit formulation.
  """
  if query.shape[2] % key.shape[2]:
    raise ValueError(f"{query.shape[2]} query heads are not a multiple of {key.shape[2]} "
                     "key/value heads")
  impl = resolve_attention(implementation, query.dtype)
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  rate = dropout_rate if dropout else 0.0
  if impl in ("xla", "cudnn") and not dropout:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=impl)
  if impl == "chunked" and query.shape[1] > ATTENTION_CHUNK:
    return _chunked_attention(query, key, value, mask, rate, dropout_rng)
  return _explicit_attention(query, key, value, mask, rate, dropout_rng)


def _grouped_mask(mask: Array, num_kv: int, groups: int) -> Array:
  """A mask broadcastable to (B, N, T, S) -> broadcastable to (B, K, G, T, S)."""
  mask = jnp.asarray(mask)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if mask.shape[1] == 1:
    return mask[:, :, None]
  return mask.reshape(mask.shape[0], num_kv, groups, *mask.shape[2:])


def _explicit_attention(query, key, value, mask, dropout_rate, dropout_rng):
  """softmax(Q K^T / sqrt(H)) V written out, with optional probability dropout."""
  b, t, n, h = query.shape
  kv_heads = key.shape[2]
  groups = n // kv_heads
  # Heads next to the batch axis: the two matmuls are plain batched GEMMs. The query is
  # scaled before the product (exact for power-of-two head sizes), so no logits-sized
  # tensor of the constant is materialised. With grouped heads the query carries a group
  # axis (B, K, G, T, H) against (B, K, S, H); with one query head per key head the
  # 4-D form is kept (its XLA:CPU code is the tuned one).
  k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)            # (B, K, S, H)
  scale = jnp.asarray(h ** -0.5, query.dtype)
  if groups == 1:
    q = query.transpose(0, 2, 1, 3) * scale                               # (B, N, T, H)
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  else:
    q = query.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 3, 1, 4) * scale
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(_grouped_mask(mask, kv_heads, groups), logits,
                         jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                (b, n, t, key.shape[1])).reshape(probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  if groups == 1:
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(value.dtype), v)
    return out.transpose(0, 2, 1, 3)
  out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(value.dtype), v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _chunked_attention(query, key, value, mask, dropout_rate, dropout_rng):
  """The explicit formulation over blocks of ATTENTION_CHUNK queries, each block
  rematerialised in the backward pass (memory O(chunk x S) per head instead of O(T x S)).
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


def padding_mask(key_mask: Array) -> Array:
  """(B, S) 1/0 key mask -> boolean (B, 1, 1, S)."""
  return key_mask.astype(bool)[:, None, None, :]


def causal_padding_mask(key_mask: Array) -> Array:
  """(B, S) key mask -> boolean (B, 1, S, S): causal and not padding."""
  length = key_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None, None] & padding_mask(key_mask)
