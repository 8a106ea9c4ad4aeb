"""mPLUG-2: the composite model, its task compositions and heads.

Spec: `shared/spec/mplug2.md` sections 1 and 6. Modules are composed per task; only the
modules a task uses are built (so parameter counts equal the official "used" counts;
`config.TASK_MODULES`):

  task            modules
  caption         video encoder, universal layers, visn_emb_norm, decoder
  videoqa         + text encoder (all layers), fusion
  retrieval       video encoder, text encoder, fusion, ITC projections + temp, ITM head
  pretrain        everything: + MLM head, decoder
  grounding       as videoqa (the decoder emits box-coordinate tokens)
  classification  video encoder + linear classifier on the video class token

Visual front (both released tasks): X = ViT(video) [-> LN(visn_fc(X)) when the vision and
text widths differ]; Y = text encoder in vision mode (universal layers); image_embeds =
LN(X + Y). Every method returns `(out, aux)`; aux keys are named like the golden
`outputs.npz` intermediates.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import linear, norms
from mplug2_jax.models import vit
from mplug2_jax.models.mplug2 import bert

Array = Any


class ItcHead(nn.Module):
  """ITC projections of the [CLS] states to `embed_dim`, L2-normalised, and the temperature."""

  embed_dim: int
  temp_init: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_cls: Array, text_cls: Array) -> tuple[Array, Array, Array]:
    proj = lambda name, x: linear.Dense(
        self.embed_dim, kernel_axes=("embed", "classes"), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)(x).astype(jnp.float32)
    normalise = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    temp = self.param("temp", nn.initializers.constant(self.temp_init), (), jnp.float32)
    return normalise(proj("vision_proj", image_cls)), normalise(proj("text_proj", text_cls)), temp


class Mplug2(nn.Module):
  """The composite mPLUG-2 model. `config` is `config.model` (models/mplug2/config.py)."""

  config: ml_collections.ConfigDict
  deterministic: bool = True
  collect: bool = False  # return per-block intermediates (parity tests)
  use_cache: bool = False  # decoder with key/value caches (incremental generation)

  def setup(self):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    tower = dict(remat_policy=cfg.remat_policy, attention=cfg.attention, **kw)
    text = cfg.text
    self.vision = vit.VideoEncoder(cfg.vision, collect=self.collect, **tower)
    if cfg.vision.width != text.hidden_size:
      self.visn_fc = linear.Dense(text.hidden_size, kernel_axes=("mlp", "embed"), **kw)
      self.visn_layer_norm = norms.Norm(text.layer_norm_eps, **kw)
    self.visn_emb_norm = norms.Norm(text.layer_norm_eps, **kw)
    self.dropout = nn.Dropout(text.dropout)
    self.text_encoder = bert.TextEncoder(text, deterministic=self.deterministic, **tower)
    self.fusion = bert.FusionEncoder(text, deterministic=self.deterministic, **tower)
    self.decoder = bert.TextDecoder(text, deterministic=self.deterministic, decode=self.use_cache,
                                    **tower)
    # Pretraining / retrieval heads.
    self.itc_head = ItcHead(cfg.embed_dim, cfg.temp, **kw)
    self.itm_head = linear.Dense(2, kernel_axes=("embed", "classes"), **kw)
    self.mlm_head = bert.LMHead(text, **kw)
    if cfg.num_classes:
      self.classifier = linear.Dense(cfg.num_classes, kernel_axes=("embed", "classes"), **kw)

  # ---- building blocks -------------------------------------------------------------

  def embed_image(self, video: Array) -> tuple[Array, dict]:
    """Video (B, T, H, W, 3) -> image_embeds (B, N_v, D) through ViT + universal layers."""
    x, aux = self.vision(video)
    aux["vision_tokens"] = x
    if self.config.vision.width != self.config.text.hidden_size:
      x = self.dropout(self.visn_layer_norm(self.visn_fc(x)), deterministic=self.deterministic)
      aux["vision_embeds_proj"] = x
    y, uni_aux = self.text_encoder.embed_vision(x)
    aux.update(uni_aux)
    aux["universal_out"] = y
    image_embeds = self.dropout(self.visn_emb_norm(x + y), deterministic=self.deterministic)
    aux["image_embeds"] = image_embeds
    return image_embeds, aux

  def embed_text(self, ids: Array, mask: Array) -> tuple[Array, dict]:
    """Token ids (B, L) -> text states (B, L, D), all encoder layers in text mode."""
    return self.text_encoder(ids, mask)

  def fuse(self, image: Array, image_mask: Array, text: Array,
           text_mask: Array) -> tuple[Array, Array]:
    """Fusion model -> (image states, text states)."""
    return self.fusion(image, image_mask, text, text_mask)

  def decode(self, ids: Array, mask: Array, encoder_states: Array, encoder_mask: Array,
             positions: Array | None = None) -> tuple[Array, dict]:
    """Teacher-forced decoder logits (B, L, V) float32 (one step at `positions` when the
    model is built with `use_cache=True`)."""
    return self.decoder(ids, mask, encoder_states, encoder_mask, positions)

  def itc_features(self, image_embeds: Array, text_states: Array) -> tuple[Array, Array, Array]:
    """L2-normalised ITC features of the [CLS] positions and the temperature."""
    return self.itc_head(image_embeds[:, 0], text_states[:, 0])

  def itm_logits(self, fused_text: Array) -> Array:
    return self.itm_head(fused_text[:, 0]).astype(jnp.float32)

  def mlm_logits(self, text_states: Array) -> Array:
    """MLM logits tied to the text-encoder word embeddings (text or fused text states)."""
    return self.mlm_head(text_states, self.text_encoder.embeddings)

  def classify(self, video: Array) -> Array:
    tokens, _ = self.vision(video)
    return self.classifier(tokens[:, 0]).astype(jnp.float32)

  # ---- task forwards ---------------------------------------------------------------

  def __call__(self, batch: dict[str, Array]) -> tuple[dict[str, Array], dict]:
    """The task's teacher-forced forward: every module the task trains is run once."""
    task = self.config.task
    out: dict[str, Array] = {}
    if task == "classification":
      out["class_logits"] = self.classify(batch["video"])
      return out, {}
    image, aux = self.embed_image(batch["video"])
    image_mask = jnp.ones(image.shape[:2], jnp.int32)
    if task == "caption":
      out["logits"], dec_aux = self.decode(batch["caption_ids"], batch["caption_mask"],
                                           image, image_mask)
      aux.update(dec_aux)
      return out, aux

    question, q_aux = self.embed_text(batch["text_ids"], batch["text_mask"])
    aux["question_embedding_output"] = q_aux["embedding_output"]
    aux["question_embeds"] = question
    if task in ("retrieval", "pretrain"):
      out["image_feat"], out["text_feat"], out["temp"] = self.itc_features(image, question)
    fused_image, fused_text = self.fuse(image, image_mask, question, batch["text_mask"])
    aux["fusion_image_out"], aux["fusion_question_out"] = fused_image, fused_text
    if task in ("retrieval", "pretrain"):
      out["itm_logits"] = self.itm_logits(fused_text)
    if task == "pretrain":
      out["mlm_logits"] = self.mlm_logits(fused_text)
      # Prefix-LM: the decoder generates the caption (or the text) from the image
      # (objectives.py).
      lm = "caption" if "caption_ids" in batch else "text"
      out["logits"], dec_aux = self.decode(batch[f"{lm}_ids"], batch[f"{lm}_mask"], image,
                                           image_mask)
      aux.update(dec_aux)
    if task in ("videoqa", "grounding"):
      states, states_mask = answer_encoder_states(
          fused_image, image_mask, fused_text, batch["text_mask"],
          batch.get("answer_question_index"))
      aux["decoder_encoder_hidden_states"] = states
      aux["decoder_encoder_attention_mask"] = states_mask
      out["logits"], dec_aux = self.decode(batch["answer_ids"], batch["answer_mask"], states,
                                           states_mask)
      aux.update(dec_aux)
    return out, aux


def answer_encoder_states(fused_image: Array, image_mask: Array, fused_text: Array,
                          text_mask: Array, answer_question_index: Array | None):
  """What the decoder cross-attends to: [image ; question] per answer row.

  The official code repeats question b's states `k[b]` times consecutively; with static
  shapes that is a gather by `answer_question_index` (N_ans,) (None: one answer each).
  """
  states = jnp.concatenate([fused_image, fused_text], axis=1)
  mask = jnp.concatenate([image_mask, text_mask.astype(image_mask.dtype)], axis=1)
  if answer_question_index is not None:
    states, mask = states[answer_question_index], mask[answer_question_index]
  return states, mask


def build(config: ml_collections.ConfigDict, *, deterministic: bool = True,
          collect: bool = False, use_cache: bool = False) -> Mplug2:
  """The model for `config.model` (frozen, so it can be a static jit argument)."""
  return Mplug2(ml_collections.FrozenConfigDict(config), deterministic=deterministic,
                collect=collect, use_cache=use_cache)
