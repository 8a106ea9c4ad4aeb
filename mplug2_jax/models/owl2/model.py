"""mPLUG-Owl2: the composite model and the multimodal sequence it feeds the LLM.

Spec: `shared/spec/owl2.md` sections 1-5. Images -> the shared CLIP ViT (`models/vit.py`;
one frame, no temporal modules, post-LN on all tokens) -> the visual abstractor
(`abstractor.py`) -> Q + 1 tokens per image at the LLM width. Token ids -> embeddings,
each image placeholder replaced by its image's tokens (`splice`) -> the LLaMA decoder with
the modality-adaptive module (`llama.py`) -> logits.

Sequence building under jit, with static shapes (owl2.md §5 and bugs 1-4, 10, 11 done
right): every input token keeps its own attention-mask value and a placeholder's value is
repeated over its image tokens, so left and right padding both stay where they were; the
sequence has the static length L + K (Q + 1 - 1) and a row shorter than that is padded
after its last input token (mask 0, zero vectors, label -100, modality 0). Position ids are
`cumsum(mask) - 1` per row, so a padded row's real tokens get the positions they have
alone. The k-th placeholder of sample b takes image slot (b, k) (`schema.py`); a sample
without placeholders takes no image. Labels are -100 on image tokens.

Methods return `(out, aux)`; with `collect`, aux keys are named like the golden
`outputs.npz` arrays (owl2_README.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import attention_op
from mplug2_jax.models import vit
from mplug2_jax.models.owl2 import abstractor as abstractor_lib
from mplug2_jax.models.owl2 import llama
from mplug2_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX

Array = Any


def splice(input_ids: Array, attention_mask: Array, labels: Array | None, text: Array,
           image_tokens: Array, image_mask: Array | None) -> dict[str, Array]:
  """Replaces each placeholder by its image's tokens, with fixed shapes.

  input_ids, attention_mask, labels (B, L); text (B, L, D) token embeddings (placeholder
  rows ignored); image_tokens (B, K, T, D): slot k of row b serves its k-th placeholder;
  image_mask (B, K) marks filled slots (a placeholder whose slot is empty or beyond K gets
  zero vectors; `schema.check_images` rejects such batches on the host).

  Returns embeds (B, P, D), modality / mask / labels (B, P) with P = L + K (T - 1).
  """
  b, length = input_ids.shape
  slots, per_image = image_tokens.shape[1], image_tokens.shape[2]
  out_length = length + slots * (per_image - 1)
  is_image = input_ids == IMAGE_TOKEN_INDEX
  width = jnp.where(is_image, per_image, 1)
  ends = jnp.cumsum(width, axis=1)                     # exclusive end of each token's span
  starts = ends - width
  p = jnp.arange(out_length)
  # The input token covering output position p: the first with end > p (L past the row).
  src = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends)
  in_row = src < length
  src = jnp.minimum(src, length - 1)
  take = lambda a: jnp.take_along_axis(a, src, axis=1)
  from_image = take(is_image) & in_row
  ordinal = take(jnp.cumsum(is_image, axis=1) - 1)    # which placeholder of the row
  offset = jnp.clip(p[None] - take(starts), 0, per_image - 1)
  slot = jnp.clip(ordinal, 0, slots - 1)
  filled = ordinal < slots
  if image_mask is not None:
    filled &= jnp.take_along_axis(image_mask, slot, axis=1).astype(bool)
  image = image_tokens[jnp.arange(b)[:, None], slot, offset]
  text = jnp.take_along_axis(text, src[..., None], axis=1)
  zero = jnp.zeros((), text.dtype)
  embeds = jnp.where(from_image[..., None], jnp.where(filled[..., None], image, zero),
                     jnp.where(in_row[..., None], text, zero))
  mask = jnp.where(in_row, take(attention_mask), 0).astype(jnp.int32)
  if labels is None:
    new_labels = jnp.full(src.shape, IGNORE_INDEX, jnp.int32)
  else:
    new_labels = jnp.where(in_row & ~from_image, take(labels), IGNORE_INDEX).astype(jnp.int32)
  return dict(embeds=embeds, modality=from_image.astype(jnp.int32), mask=mask,
              labels=new_labels)


def last_positions(mask: Array) -> Array:
  """(B, T) mask -> (B,) index of each row's last real position (its next-token logits)."""
  length = mask.shape[-1]
  return length - 1 - jnp.argmax(jnp.flip(mask.astype(bool), axis=-1), axis=-1)


class Owl2(nn.Module):
  """The composite mPLUG-Owl2 model. `config` is `config.model` (models/owl2/config.py)."""

  config: ml_collections.ConfigDict
  deterministic: bool = True  # no dropout in Owl2; kept for the family interface
  collect: bool = False       # per-layer intermediates (parity tests)
  use_cache: bool = False     # LLM with key/value caches (generation)

  def setup(self):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    tower = dict(remat_policy=cfg.remat_policy, attention=cfg.attention, **kw)
    self.vision = vit.VideoEncoder(cfg.vision, collect=self.collect, **tower)
    self.abstractor = abstractor_lib.Abstractor(cfg.abstractor, cfg.llm.hidden_size,
                                                collect=self.collect, **tower)
    self.llm = llama.Llama(cfg.llm, use_cache=self.use_cache, collect=self.collect, **tower)

  # ---- building blocks -------------------------------------------------------------

  def encode_images(self, images: Array) -> tuple[Array, dict]:
    """Images (N, S, S, 3) -> LLM image tokens (N, Q + 1, D)."""
    size = self.config.image_size
    if tuple(images.shape[1:3]) != (size, size):
      raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} pixels, but the model "
                       f"is for {size}x{size} (config.model.image_size): the positional tables "
                       f"fix the size (no interpolation)")
    tokens, aux = self.vision(images[:, None])
    aux["vision_last_hidden_state"] = tokens
    out, ab_aux = self.abstractor(tokens)
    aux.update(ab_aux)
    aux["abstractor_output"] = out
    return out, aux

  def embed_inputs(self, input_ids: Array, attention_mask: Array, labels: Array | None = None,
                   images: Array | None = None, image_mask: Array | None = None
                   ) -> tuple[dict[str, Array], dict]:
    """The LLM input sequence: dict(embeds, modality, mask, labels, positions) (B, P, ...)
    and the image aux. Without images (None or K = 0) the ids go straight in (P = L)."""
    pad = self.config.llm.pad_token_id
    text = self.llm.embed_tokens(jnp.where(input_ids == IMAGE_TOKEN_INDEX, pad, input_ids))
    aux: dict = {}
    if images is None or images.shape[1] == 0:
      seq = dict(embeds=text, modality=jnp.zeros(input_ids.shape, jnp.int32),
                 mask=attention_mask.astype(jnp.int32),
                 labels=(jnp.full(input_ids.shape, IGNORE_INDEX, jnp.int32) if labels is None
                         else labels.astype(jnp.int32)))
    else:
      b, k = images.shape[:2]
      tokens, aux = self.encode_images(images.reshape((b * k,) + images.shape[2:]))
      tokens = tokens.reshape((b, k) + tokens.shape[1:])
      seq = splice(input_ids, attention_mask, labels, text, tokens, image_mask)
    seq["positions"] = llama.positions_from_mask(seq["mask"])
    return seq, aux

  def llm_states(self, embeds: Array, modality: Array, positions: Array, mask: Array,
                 cache_mask: Array | None = None) -> tuple[Array, dict]:
    """Decoder states after the final norm. Without a cache `mask` (B, T) is the key
    padding mask (made causal here); with one, `cache_mask` (B, S_cache) marks the valid
    cache slots (the prompt's mask, then ones for generated tokens)."""
    attn_mask = None if self.use_cache else attention_op.causal_padding_mask(mask)
    return self.llm(embeds, modality, positions, attn_mask, cache_mask)

  def token_states(self, ids: Array, positions: Array, cache_mask: Array) -> Array:
    """One cached decoding step for generated (text) tokens: ids (B, T) -> states."""
    states, _ = self.llm(self.llm.embed_tokens(ids), jnp.zeros(ids.shape, jnp.int32),
                         positions, None, cache_mask)
    return states

  def logits(self, states: Array) -> Array:
    return self.llm.logits(states)

  # ---- the training forward ----------------------------------------------------------

  def __call__(self, batch: dict[str, Array]) -> tuple[dict[str, Array], dict]:
    """Teacher-forced forward: out = {logits (B, P, V) float32, labels, mask (B, P)}."""
    seq, aux = self.embed_inputs(batch["input_ids"], batch["attention_mask"],
                                 batch.get("labels"), batch.get("images"),
                                 batch.get("image_mask"))
    if batch.get("segment_ids") is not None:  # packed rows (packing.py)
      from mplug2_jax.models.owl2 import packing

      per_image = seq["embeds"].shape[1] - batch["input_ids"].shape[1]
      slots = batch["images"].shape[1] if batch.get("images") is not None else 0
      per_image = per_image // slots + 1 if slots else 1
      segments = packing.expand(batch["input_ids"], batch["segment_ids"], per_image,
                                seq["embeds"].shape[1])
      segments = jnp.where(seq["mask"] > 0, segments, 0)
      seq["positions"] = packing.positions(segments)
      states, llm_aux = self.llm(seq["embeds"], seq["modality"], seq["positions"],
                                 packing.attention_mask(segments))
    else:
      states, llm_aux = self.llm_states(seq["embeds"], seq["modality"], seq["positions"],
                                        seq["mask"])
    out = {"logits": self.logits(states), "labels": seq["labels"], "mask": seq["mask"]}
    if self.collect:
      aux.update(llm_aux, inputs_embeds=seq["embeds"], modality_indicators=seq["modality"],
                 expanded_attention_mask=seq["mask"], expanded_labels=seq["labels"],
                 position_ids=seq["positions"], llm_final_states=states)
    return out, aux


def build(config: ml_collections.ConfigDict, *, deterministic: bool = True,
          collect: bool = False, use_cache: bool = False) -> Owl2:
  """The model for `config.model` (frozen, so it can be a static jit argument); with
  `config.model.lora.rank > 0` the LoRA-adapted model (`lora.py`)."""
  if config.get("lora") is not None and config.lora.rank > 0:
    from mplug2_jax.models.owl2 import lora

    return lora.LoraOwl2(ml_collections.FrozenConfigDict(config), deterministic=deterministic,
                         collect=collect, use_cache=use_cache)
  return Owl2(ml_collections.FrozenConfigDict(config), deterministic=deterministic,
              collect=collect, use_cache=use_cache)
