"""LLaMA-2 decoder with the modality-adaptive module (`owl2.md` §4).

Per layer, with m the per-token modality (0 = text, 1 = image):

  h = x + o( Attn( RMSNorm_m(x) ) )        Q shared, K/V per modality (multiway)
  y = h + down( silu(gate(n)) * up(n) ),   n = RMSNorm'_m(h)

Attention is one causal attention over the whole sequence (text and image tokens alike),
with the padding mask, rotary embeddings (split halves, float32 angles) at per-row
position ids, and grouped-query heads when `num_kv_heads < num_heads` (the official code
crashes there, bug 5). The per-modality norms and K/V projections run both copies and keep
each token's own (`layers/multiway.py`): exact, one extra K/V projection per token.

With `use_cache` the attention keeps a key/value cache (keys after RoPE); decoded tokens
are text tokens (modality 0), as officially. Parameters: `embed` (vocab, D), `layers/...`
(scanned: `input_norm` / `post_norm` (layers, 2, D), `attn/{query,key,value,out}` with
per-modality `key`/`value` (layers, 2, D, K, H), `mlp/{gate,wi,wo}`), `norm`, `lm_head`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import attentions, axes, linear, mlp, multiway, norms, stack

Array = Any


class DecoderLayer(nn.Module):
  """One decoder layer; the scan carry is the hidden state (B, T, D)."""

  cfg: ml_collections.ConfigDict  # config.model.llm
  attention: str = "xla"
  use_cache: bool = False
  collect: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, modality: Array, positions: Array, mask: Array | None,
               cache_mask: Array | None):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = multiway.multiway(norms.Norm, cfg.num_modalities)

    h = multiway.select(norm(cfg.rms_norm_eps, kind="rmsnorm", name="input_norm", **kw)(x),
                        modality)
    x = x + attentions.MultiHeadAttention(
        cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.hidden_size,
        num_kv_heads=cfg.num_kv_heads, use_bias=False, rope_theta=cfg.rope_theta,
        num_modalities=cfg.num_modalities, implementation=self.attention,
        cache="self" if self.use_cache else "none", name="attn", **kw)(
            h, mask=mask, positions=positions, modality=modality, cache_mask=cache_mask)
    h = multiway.select(norm(cfg.rms_norm_eps, kind="rmsnorm", name="post_norm", **kw)(x),
                        modality)
    x = x + mlp.Mlp(cfg.intermediate_size, cfg.hidden_size, act="silu", gated=True,
                    use_bias=False, name="mlp", **kw)(h)
    x = axes.constrain(x)
    return x, (x if self.collect else None)


class Llama(nn.Module):
  """Embeddings, the decoder stack, final norm and LM head."""

  cfg: ml_collections.ConfigDict  # config.model.llm
  remat_policy: str = "none"
  attention: str = "xla"
  use_cache: bool = False
  collect: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                          embedding_init=axes.param_init(nn.initializers.normal(0.02),
                                                         ("vocab", "embed")), **kw)
    self.layers = stack.stack(DecoderLayer, cfg.layers, self.remat_policy, broadcast_args=4)(
        cfg, self.attention, self.use_cache, self.collect, **kw)
    self.norm = norms.Norm(cfg.rms_norm_eps, kind="rmsnorm", **kw)
    self.lm_head = linear.Dense(cfg.vocab_size, kernel_axes=("embed", "vocab"), use_bias=False,
                                **kw)

  def embed_tokens(self, ids: Array) -> Array:
    return axes.constrain(self.embed(ids))

  def __call__(self, x: Array, modality: Array, positions: Array, mask: Array | None,
               cache_mask: Array | None = None) -> tuple[Array, dict]:
    """Input embeddings (B, T, D) -> states after the final norm (B, T, D), aux.

    `mask`: boolean, broadcastable to (B, heads, T, T) (causal and padding) when there is
    no cache; with a cache, `cache_mask` (B, S_cache) marks the valid cache slots and the
    causal part comes from the cache index. With `collect`, aux holds
    "llm_layer_outputs" (layers, B, T, D) (before the final norm).
    """
    x, per_layer = self.layers(x, modality, positions, mask, cache_mask)
    aux = {"llm_layer_outputs": per_layer} if self.collect else {}
    return self.norm(x), aux

  def logits(self, states: Array) -> Array:
    """Float32 logits (..., vocab) of final-norm states."""
    return self.lm_head(states).astype(jnp.float32)


def positions_from_mask(mask: Array) -> Array:
  """Per-row position ids: cumulative count of real tokens minus one (0 on leading
  padding). Left and right padding give every real token the position it has alone."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)

