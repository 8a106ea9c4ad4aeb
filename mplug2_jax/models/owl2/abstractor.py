"""The visual abstractor: learned queries that resample the ViT tokens (`owl2.md` §3).

One layer, for the query stream x (N, Q, D) and the ViT output img (N, T, D) (the same
`img` in every layer):

  q = norm_q(x); k = norm_k(img)                 LayerNorms with eps 1e-5 (PyTorch default;
                                                 the official code ignores the config here)
  keys/values over [q ; k] (Q + T rows): the queries attend to themselves and the image
  attn = MHA(query: q + pos_q, key: [q ; k] + [pos_q ; pos_k], value: [q ; k])
  y = q + attn                                   residual from the *normalised* queries
  x' = y + SwiGLU(norm_out(y))                   w2(ffn_ln(silu(w1 z) * w3 z)), ffn_ln with
                                                 the config eps (1e-6)

The fixed sin-cos tables are added to the key and query projection inputs only (never to
the residual stream): pos_q is the 1-D table of the query index, pos_k an all-zero row for
the class token and the 2-D table of the patch grid, [T(column), T(row)] per patch
(`layers/embeddings.py`). After the last layer: `visual_fc` to the LLM width and the learned
end token `vit_eos` appended: Q + 1 tokens per image.

The attention output projection is `MultiHeadAttention`'s `out` (official `out_proj`,
applied after the heads are concatenated).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from mplug2_jax.layers import attentions, axes, embeddings, linear, mlp, norms, stack

Array = Any


def position_tables(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(pos_q (Q, D), pos_k (1 + G², D)): the official `q_pos_embed` / `k_pos_embed`."""
  d = cfg.hidden_size
  pos_q = embeddings.sincos_1d(np.arange(cfg.num_queries), d)
  pos_k = embeddings.sincos_2d(cfg.grid_size, d, cls_token=True)
  return pos_q, pos_k


def kernel_init(cfg: ml_collections.ConfigDict):
  """Normal(`init_std`) for every abstractor kernel: the official `initializer_range` 0.02
  by default (parameter directories written without the key get it too)."""
  return nn.initializers.normal(cfg.get("init_std", 0.02))


class AbstractorLayer(nn.Module):
  """One abstractor layer; the scan carry is the query stream."""

  cfg: ml_collections.ConfigDict  # config.model.abstractor
  attention: str = "xla"
  collect: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, image: Array, pos_q: Array, pos_k: Array):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = cfg.hidden_size
    q = norms.Norm(cfg.norm_eps, name="norm_q", **kw)(x)
    k = norms.Norm(cfg.norm_eps, name="norm_k", **kw)(image)
    kv = jnp.concatenate([q, k], axis=1)
    key_pos = jnp.concatenate([pos_q, pos_k], axis=0).astype(kv.dtype)
    init = kernel_init(cfg)
    attn = attentions.MultiHeadAttention(
        cfg.num_heads, d // cfg.num_heads, d, implementation=self.attention, name="attn",
        kernel_init=init, **kw)(q + pos_q.astype(q.dtype), kv, inputs_k=kv + key_pos)
    y = q + attn
    h = norms.Norm(cfg.norm_eps, name="norm_out", **kw)(y)
    x = y + mlp.Mlp(cfg.intermediate_size, d, act="silu", gated=True, use_bias=True,
                    inner_norm_eps=cfg.layer_norm_eps, kernel_init=init, name="mlp", **kw)(h)
    x = axes.constrain(x)
    return x, (x if self.collect else None)


class Abstractor(nn.Module):
  """ViT tokens (N, T, D) -> image tokens for the LLM (N, Q + 1, D_llm).

  Returns `(tokens, aux)`; with `collect`, aux["abstractor_layer_outputs"] is
  (layers, N, Q, D) (the query stream after each layer).
  """

  cfg: ml_collections.ConfigDict  # config.model.abstractor
  out_features: int               # the LLM width
  remat_policy: str = "none"
  attention: str = "xla"
  collect: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: Array) -> tuple[Array, dict]:
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pos_q, pos_k = position_tables(cfg)
    if image.shape[1] != pos_k.shape[0]:
      raise ValueError(f"the abstractor's key table has {pos_k.shape[0]} rows (grid_size "
                       f"{cfg.grid_size}) but the vision tower gave {image.shape[1]} tokens")
    # Official init: torch.randn (owl2.md section 10).
    queries = self.param("query_embeds", axes.param_init(nn.initializers.normal(1.0),
                                                         ("latents", "embed")),
                         (cfg.num_queries, cfg.hidden_size), self.param_dtype)
    x = jnp.broadcast_to(queries.astype(self.dtype), (image.shape[0],) + queries.shape)
    layers = stack.stack(AbstractorLayer, cfg.layers, self.remat_policy, broadcast_args=3)
    x, per_layer = layers(cfg, self.attention, self.collect, name="layers", **kw)(
        x, image.astype(self.dtype), jnp.asarray(pos_q), jnp.asarray(pos_k))
    tokens = linear.Dense(self.out_features, kernel_axes=("mlp", "embed"), name="visual_fc",
                          kernel_init=kernel_init(cfg), **kw)(x)
    eos = self.param("vit_eos", axes.param_init(nn.initializers.normal(1.0), ("embed",)),
                     (self.out_features,), self.param_dtype).astype(self.dtype)
    eos = jnp.broadcast_to(eos, (tokens.shape[0], 1, self.out_features))
    out = axes.constrain(jnp.concatenate([tokens, eos], axis=1))
    return out, ({"abstractor_layer_outputs": per_layer} if self.collect else {})
