"""BERT towers of mPLUG-2: text encoder with universal layers, fusion model, decoder.

Spec: `shared/spec/mplug2.md` sections 3-5. All three towers use the same post-norm
`BertLayer` (self-attention -> optional cross-attention -> FFN, each followed by
`LN(dropout(sublayer) + residual)`), built from the shared blocks in `mplug2_jax/layers/`.

Text encoder (L layers, the last U "universal"):
  text mode   embeddings -> all L layers as plain self-attention + FFN layers.
  vision mode only the U universal layers: learnable latent queries self-attend and
              cross-attend to the visual tokens X; in the last universal layer the roles
              swap (X self-attends and cross-attends to the latent states).
Fusion model: the F layers that run; layer j is a cross layer (text self-attn -> text
  cross-attends to image -> FFN) unless j > 0 and j % stride == 0, where it is a joint
  layer (one self-attention over [image ; text], image gets an extra residual).
Decoder: own embeddings, causal self-attention, cross-attention, tied LM head.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import activations, attention_op, attentions, axes, linear, mlp, norms, stack

Array = Any


class Embeddings(nn.Module):
  """word + position + token-type(0) embeddings, LayerNorm, dropout."""

  cfg: ml_collections.ConfigDict  # config.model.text
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    init = nn.initializers.normal(0.02)
    self.word = embed(cfg.vocab_size, embedding_init=axes.param_init(init, ("vocab", "embed")))
    self.position = embed(cfg.max_position_embeddings,
                          embedding_init=axes.param_init(init, ("position", "embed")))
    self.token_type = embed(cfg.type_vocab_size,
                            embedding_init=axes.param_init(init, ("position", "embed")))
    self.norm = norms.Norm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(cfg.dropout)

  def __call__(self, ids: Array, positions: Array | None = None) -> Array:
    if positions is None:
      positions = jnp.arange(ids.shape[1])[None]
    x = self.word(ids) + self.position(positions) + self.token_type(jnp.zeros_like(ids))
    x = self.dropout(self.norm(x), deterministic=self.deterministic)
    return axes.constrain(x)

  def attend(self, h: Array) -> Array:
    """Logits against the (tied) word embeddings."""
    return self.word.attend(h)


class BertLayer(nn.Module):
  """Post-norm BERT layer; the scan carry is the query-side hidden state.

  `encoder_states=None` skips the cross-attention (text mode of universal layers).
  Masks are boolean, broadcastable to (B, heads, T, S); None means attend everywhere.
  """

  cfg: ml_collections.ConfigDict  # config.model.text
  attention: str = "xla"
  deterministic: bool = True
  decode: bool = False  # incremental decoding with key/value caches (decoder only)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def sublayer(self, name: str, x: Array, update: Array) -> Array:
    update = nn.Dropout(self.cfg.dropout)(update, deterministic=self.deterministic)
    return norms.Norm(self.cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=name)(update + x)

  @nn.compact
  def __call__(self, x: Array, self_mask: Array | None = None,
               encoder_states: Array | None = None, encoder_mask: Array | None = None):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = cfg.hidden_size
    attn = functools.partial(attentions.MultiHeadAttention, cfg.num_heads, width // cfg.num_heads,
                             width, implementation=self.attention,
                             dropout_rate=cfg.attention_dropout, **kw)
    self_cache, cross_cache = ("self", "cross") if self.decode else ("none", "none")
    x = self.sublayer("self_attn_norm", x, attn(name="self_attn", cache=self_cache)(
        x, mask=self_mask, deterministic=self.deterministic))
    if encoder_states is not None:
      x = self.sublayer("cross_attn_norm", x, attn(name="cross_attn", cache=cross_cache)(
          x, encoder_states, mask=encoder_mask, deterministic=self.deterministic))
    x = self.sublayer("mlp_norm", x, mlp.Mlp(cfg.intermediate_size, width, act=cfg.hidden_act,
                                                name="mlp", **kw)(x))
    return axes.constrain(x), None


def _stacked_bert(cfg, length: int, remat_policy: str, name: str | None = None, **kw):
  return stack.stack(BertLayer, length, remat_policy, broadcast_args=3)(cfg, name=name, **kw)


class TextEncoder(nn.Module):
  """BERT text encoder whose last `universal_layers` layers are shared with vision."""

  cfg: ml_collections.ConfigDict  # config.model.text
  remat_policy: str = "none"
  attention: str = "xla"
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    kw = dict(attention=self.attention, deterministic=self.deterministic, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.embeddings = Embeddings(cfg, self.deterministic, self.dtype, self.param_dtype)
    num_text_only = cfg.encoder_layers - cfg.universal_layers
    if num_text_only:
      self.text_layers = _stacked_bert(cfg, num_text_only, self.remat_policy, **kw)
    self.universal = [BertLayer(cfg, **kw) for _ in range(cfg.universal_layers)]
    self.latent_queries = self.param(
        "latent_queries", axes.param_init(nn.initializers.normal(1.0), ("latents", "embed")),
        (cfg.num_latents, cfg.hidden_size), self.param_dtype)

  def __call__(self, ids: Array, mask: Array) -> tuple[Array, dict]:
    """Text mode: every layer, self-attention + FFN (universal cross-attention unused)."""
    x = self.embeddings(ids)
    aux = {"embedding_output": x}
    self_mask = attention_op.padding_mask(mask)
    if self.cfg.encoder_layers > self.cfg.universal_layers:
      x, _ = self.text_layers(x, self_mask, None, None)
    for layer in self.universal:
      x, _ = layer(x, self_mask)
    return x, aux

  def embed_vision(self, visual: Array) -> tuple[Array, dict]:
    """Vision mode: the universal layers over visual tokens X (B, N, D) -> (B, N, D)."""
    batch = visual.shape[0]
    latents = self.latent_queries.astype(self.dtype)
    queries = jnp.broadcast_to(latents, (batch, *latents.shape))
    aux = {}
    for j, layer in enumerate(self.universal[:-1]):
      queries, _ = layer(queries, None, visual, None)
      aux[f"universal_v_layer{j}"] = queries
    # Role swap: the visual tokens become the query sequence and cross-attend to the
    # latent states (with U == 1 these are the raw latent parameters).
    out, _ = self.universal[-1](visual, None, queries, None)
    aux[f"universal_v_layer{len(self.universal) - 1}"] = out
    return out, aux


class FusionLayer(nn.Module):
  """A running fusion layer; carry (image, text), broadcast (image_mask, text_mask)."""

  cfg: ml_collections.ConfigDict
  joint: bool = False
  attention: str = "xla"
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, image_mask: Array, text_mask: Array):
    image, text = carry
    layer = BertLayer(self.cfg, attention=self.attention, deterministic=self.deterministic,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="layer")
    if self.joint:
      joint_mask = jnp.concatenate([image_mask, text_mask], axis=-1)
      out, _ = layer(jnp.concatenate([image, text], axis=1), joint_mask)
      num_image = image.shape[1]
      # The official split adds the joint output to the previous image states.
      return (image + out[:, :num_image], out[:, num_image:]), None
    text, _ = layer(text, text_mask, image, image_mask)
    return (image, text), None


class FusionEncoder(nn.Module):
  """The running fusion layers, grouped into scanned runs of cross / joint layers."""

  cfg: ml_collections.ConfigDict
  remat_policy: str = "none"
  attention: str = "xla"
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: Array, image_mask: Array, text: Array, text_mask: Array):
    running = min(self.cfg.fusion_layers, self.cfg.fusion_layers_built)
    kinds = [j > 0 and j % self.cfg.fusion_stride == 0 for j in range(running)]
    carry = (image, text)
    image_mask, text_mask = attention_op.padding_mask(image_mask), attention_op.padding_mask(text_mask)
    for joint, start, length in stack.runs(kinds):
      run = stack.stack(FusionLayer, length, self.remat_policy, broadcast_args=2)(
          self.cfg, joint, self.attention, self.deterministic, self.dtype, self.param_dtype,
          name=f"layers_{start}")
      carry, _ = run(carry, image_mask, text_mask)
    return carry


class LMHead(nn.Module):
  """BERT prediction head: dense -> act -> LN -> tied word embeddings + bias."""

  cfg: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, embeddings: Embeddings) -> Array:
    cfg = self.cfg
    h = linear.Dense(cfg.hidden_size, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="transform")(h)
    h = activations.activation(cfg.hidden_act)(h)
    h = norms.Norm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="norm")(h)
    bias = self.param("bias", axes.param_init(nn.initializers.zeros_init(), ("vocab",)),
                      (cfg.vocab_size,), self.param_dtype)
    logits = embeddings.attend(h).astype(jnp.float32) + bias.astype(jnp.float32)
    return axes.constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


class TextDecoder(nn.Module):
  """The shared text decoder: causal self-attention, cross-attention, tied LM head.

  With `decode`, self-attention keys/values and the projected encoder keys/values live in
  a "cache" collection: prime it with a full-length call, then feed one token per call
  with its `positions` (see `evaluate/generation.py`).
  """

  cfg: ml_collections.ConfigDict
  remat_policy: str = "none"
  attention: str = "xla"
  deterministic: bool = True
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(attention=self.attention, deterministic=self.deterministic, decode=self.decode,
              dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = Embeddings(self.cfg, self.deterministic, self.dtype, self.param_dtype)
    self.layers = _stacked_bert(self.cfg, self.cfg.decoder_layers, self.remat_policy, **kw)
    self.head = LMHead(self.cfg, self.dtype, self.param_dtype)

  def __call__(self, ids: Array, mask: Array, encoder_states: Array,
               encoder_mask: Array, positions: Array | None = None) -> tuple[Array, dict]:
    """Teacher-forced logits (B, L, V) at every position (position t scores token t+1)."""
    x = self.embeddings(ids, positions)
    x, _ = self.layers(x, attention_op.causal_padding_mask(mask), encoder_states,
                       attention_op.padding_mask(encoder_mask))
    return self.head(x, self.embeddings), {"decoder_hidden": x}
