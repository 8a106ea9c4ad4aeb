"""mPLUG-2 inference for evaluation: jitted functions of (params, batch arrays).

The evaluators (`evaluate/<task>.py`) iterate, decode text, gather and score; what runs
the model is here. Each sample's encoder states are computed once (the beam search shares
them over its beams).

  caption(model_cfg, s)            (params, video) -> ids (B, max_length + 1)
  videoqa_generate(model_cfg, s)   (params, video, text_ids, text_mask) -> ids
  videoqa_rank(model_cfg, s, answer_ids, answer_mask)
                                   (params, video, text_ids, text_mask) -> answer index (B,)
  retrieval_features(model_cfg)    (params, video, text_ids, text_mask)
                                   -> (image_feat, text_feat, image_states, text_states)
  text_features(model_cfg)         (params, ids, mask) -> (text_feat, text_states)
  itm_scores(model_cfg, image_states, text_states, text_mask)
                                   (params, text_rows, video_rows) -> ITM match scores
  classify(model_cfg)              (params, video) -> logits (B, classes)
  grounding(model_cfg, prefix_id, coord_ids)
                                   (params, video, text_ids, text_mask) -> box bins (B, 4)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mplug2_jax.models.mplug2 import generation, model as model_lib

BOX_STEPS = 4  # grounding: cx, cy, w, h bins after the prefix token


def _apply(model, method: str) -> Callable:
  return lambda params, *args: model.apply({"params": params}, *args, method=method)


def _qa_encoder(model) -> Callable:
  """(params, video, text_ids, text_mask) -> decoder encoder states and mask."""
  embed_image, embed_text = _apply(model, "embed_image"), _apply(model, "embed_text")
  fuse = _apply(model, "fuse")

  def encode(params, video, text_ids, text_mask):
    image, _ = embed_image(params, video)
    image_mask = jnp.ones(image.shape[:2], jnp.int32)
    question, _ = embed_text(params, text_ids, text_mask)
    fused_image, fused_text = fuse(params, image, image_mask, question, text_mask)
    return model_lib.answer_encoder_states(fused_image, image_mask, fused_text, text_mask,
                                           None)

  return encode


def caption(model_cfg: ml_collections.ConfigDict, s: ml_collections.ConfigDict) -> Callable:
  model = model_lib.build(model_cfg)
  cached = model_lib.build(model_cfg, use_cache=True)
  embed = _apply(model, "embed_image")

  @jax.jit
  def run(params, video):
    image, _ = embed(params, video)
    mask = jnp.ones(image.shape[:2], jnp.int32)
    return generation.beam_search_cached(cached, params, image, mask, beam_size=s.beam_size,
                                         min_length=s.min_length, max_length=s.max_length).ids

  return run


def videoqa_generate(model_cfg: ml_collections.ConfigDict,
                     s: ml_collections.ConfigDict) -> Callable:
  model = model_lib.build(model_cfg)
  cached = model_lib.build(model_cfg, use_cache=True)
  encode = _qa_encoder(model)

  @jax.jit
  def run(params, video, text_ids, text_mask):
    states, mask = encode(params, video, text_ids, text_mask)
    return generation.beam_search_cached(
        cached, params, states, mask, beam_size=s.beam_size, min_length=s.min_length,
        max_length=s.max_length).ids

  return run


def videoqa_rank(model_cfg: ml_collections.ConfigDict, s: ml_collections.ConfigDict,
                 answer_ids, answer_mask) -> Callable:
  """Answer-list ranking (official `rank_answer`, `s.k_test` shortlist); returns the index
  of the best answer. `s.count_first_token_twice` is the official double count."""
  model = model_lib.build(model_cfg)
  encode, decode = _qa_encoder(model), _apply(model, "decode")
  answer_ids, answer_mask = jnp.asarray(answer_ids), jnp.asarray(answer_mask)
  k = min(int(s.k_test), answer_ids.shape[0])
  twice = bool(s.get("count_first_token_twice", True))

  @jax.jit
  def run(params, video, text_ids, text_mask):
    states, mask = encode(params, video, text_ids, text_mask)
    decode_fn = lambda i, m, st, sm: decode(params, i, m, st, sm)[0]
    top, _ = generation.rank_answers(decode_fn, states, mask, answer_ids, answer_mask, k,
                                     count_first_token_twice=twice)
    return top[:, 0]

  return run


def retrieval_features(model_cfg: ml_collections.ConfigDict) -> Callable:
  model = model_lib.build(model_cfg)
  embed_image, embed_text = _apply(model, "embed_image"), _apply(model, "embed_text")
  itc = _apply(model, "itc_features")

  @jax.jit
  def run(params, video, text_ids, text_mask):
    image, _ = embed_image(params, video)
    text, _ = embed_text(params, text_ids, text_mask)
    image_feat, text_feat, _ = itc(params, image, text)
    return image_feat, text_feat, image, text

  return run


def text_features(model_cfg: ml_collections.ConfigDict) -> Callable:
  model = model_lib.build(model_cfg)
  embed_text, itc = _apply(model, "embed_text"), _apply(model, "itc_features")

  @jax.jit
  def run(params, ids, mask):
    text, _ = embed_text(params, ids, mask)
    _, text_feat, _ = itc(params, text, text)  # the text projection of the text [CLS]
    return text_feat, text

  return run


def itm_scores(model_cfg: ml_collections.ConfigDict, image_states, text_states,
               text_mask) -> Callable:
  """Match probability logits of (text row, video row) pairs through fusion + ITM head."""
  model = model_lib.build(model_cfg)
  fuse, itm = _apply(model, "fuse"), _apply(model, "itm_logits")
  image_states = jnp.asarray(image_states)
  text_states, text_mask = jnp.asarray(text_states), jnp.asarray(text_mask)

  @jax.jit
  def run(params, t, v):
    image = image_states[v]
    _, fused_text = fuse(params, image, jnp.ones(image.shape[:2], jnp.int32),
                         text_states[t], text_mask[t])
    return itm(params, fused_text)[:, 1]

  return run


def classify(model_cfg: ml_collections.ConfigDict) -> Callable:
  return jax.jit(_apply(model_lib.build(model_cfg), "classify"))


def grounding(model_cfg: ml_collections.ConfigDict, prefix_id: int, coord_ids) -> Callable:
  """Greedy decoding of the 4 box tokens after the prefix, restricted to the coordinate
  tokens (mPLUG grounding); returns the chosen bins (B, 4)."""
  model = model_lib.build(model_cfg)
  encode, decode = _qa_encoder(model), _apply(model, "decode")
  coords = jnp.asarray(coord_ids)

  @jax.jit
  def run(params, video, text_ids, text_mask):
    states, mask = encode(params, video, text_ids, text_mask)
    b = states.shape[0]
    seq = jnp.zeros((b, BOX_STEPS + 1), jnp.int32).at[:, 0].set(prefix_id)
    ones = jnp.ones_like(seq)  # causal: the unfilled positions are never attended to
    bins = []
    for step in range(BOX_STEPS):
      logits = decode(params, seq, ones, states, mask)[0][:, step]
      q = jnp.argmax(logits[:, coords], axis=-1)
      seq = seq.at[:, step + 1].set(coords[q])
      bins.append(q)
    return jnp.stack(bins, axis=1)

  return run
