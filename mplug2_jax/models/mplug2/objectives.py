"""mPLUG-2 training objectives: the loss of each task, and the momentum model and ITC
queues the retrieval and pre-training objectives keep between steps.

Spec: `shared/spec/mplug2.md` sections 6 (task losses) and 13 (pre-training: ITC with a
momentum model and feature queues, ITM with hard negatives, MLM, prefix-LM); the official
code differences and their switches are listed in `docs/official_quirks.md`.

  caption         decoder CE, token mean (per device, then averaged: `token_mean`)
  videoqa         per-answer summed CE, weighted, / number of questions
  grounding       CE over the 337 box tokens, weighted by L1 x (1 - GIoU) (`grounding_loss`)
  classification  softmax cross-entropy (optional label smoothing)
  retrieval       ITC (momentum + queues) + ITM (hard negatives)
  pretrain        ITC + ITM + MLM (on the fusion output) + prefix-LM (decoder captioning);
                  a batch without "video" (text-only corpus) trains MLM on the text encoder

Local batches. The train step is one `jax.jit` over global arrays whose batch axis is split
over the `shards` devices of the data x fsdp mesh axes (device g holds rows g b .. g b + b -
1 of a micro-batch, b = rows / shards). The official code computes its in-batch terms on
each GPU's own batch: ITC similarities and positives over [local momentum features ; queue],
ITM hard negatives drawn from the local batch, token means per device; the all-gather only
fills the queue (M1 `models/model_retrieval_mplug.py`). With `negatives="local"` and
`token_mean="device"` (the official defaults) those terms are computed per group of b rows
(arrays reshaped to (shards, b, ...); the batch-dim gathers and matmuls partition without
communication); "global" / "batch" treat the micro-batch as one group.

The generic train step (`train/step.py`) calls, per optimizer step:
  extra = before_update(extra, params, c)        EMA of the momentum model
  loss, (metrics, enqueued) = loss(model, params, extra, batch, rng, c,
                                   iteration=i, shards=G)
  extra = after_update(extra, enqueued)          queues <- momentum features
where `extra` is `init_extra(...)` ({} for tasks without ITC): the state this family's
objectives keep beside the parameters; `iteration` is the micro-batch's index in the run
(the distillation ramp) and `shards` the number of local batches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mplug2_jax import config_lib
from mplug2_jax.layers import losses
from mplug2_jax.tokens import BERT_BOX_BINS, BERT_BOX_FIRST_ID
from mplug2_jax.tokens import BERT_CLS_ID as CLS_ID, BERT_MASK_ID as MASK_ID
from mplug2_jax.tokens import BERT_PAD_ID as PAD_ID, IGNORE_INDEX

Array = Any

# Modules of the momentum (EMA) model: the ITC feature path (official `model_pairs`); with
# MLM distillation also the fusion model and the MLM head (ALBEF's `text_encoder_m`).
MOMENTUM_MODULES = ("vision", "visn_fc", "visn_layer_norm", "visn_emb_norm", "text_encoder",
                    "itc_head")
MLM_MOMENTUM_MODULES = ("fusion", "mlm_head")
ITC_TASKS = ("retrieval", "pretrain")
NEGATIVES = ("local", "global")
TOKEN_MEANS = ("device", "batch")
GROUNDING_LOSSES = ("official", "per_box", "unweighted")
BOX_MASK = -10000.0  # official `bbox_prob_mask`: added to the logits of non-box tokens


def default_config() -> ml_collections.ConfigDict:
  """`config.objective`: every key this module reads."""
  c = ml_collections.ConfigDict()
  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, mlm=1.0, lm=1.0))
  c.queue_size = 65536        # ITC feature queue (a multiple of the global batch); 0 = none
  c.momentum = 0.995          # EMA of the momentum model
  c.alpha = 0.4               # ITC (and MLM) distillation weight of the momentum model
  c.alpha_ramp_steps = 0      # official `warm_up`: alpha ramps linearly from 0 over this
                              # many iterations (retrieval / pretrain configs: epoch 0);
                              # 0 = alpha from the first step
  c.negatives = "local"       # official: ITC in-batch keys / positives and ITM hard
                              # negatives from each device's local batch; "global": the
                              # whole (micro-)batch
  c.hard_negative_eps = 0.0   # added to the softmax weights of the hard-negative draw
                              # (official M1 retrieval: none)
  c.token_mean = "device"     # caption / MLM / prefix-LM token means: "device" (official:
                              # per device, then averaged) | "batch" (over the micro-batch)
  c.mlm_distill = False       # MLM soft labels from the momentum model (ALBEF convention,
                              # M2 `FusionForMaskedLM` soft_labels) [unverified for mPLUG-2]
  c.grounding_loss = "official"  # official | per_box | unweighted (grounding_loss)
  c.temp_range = ()           # (min, max) clamp of the learnable temperature; () = none
                              # (mPLUG retrieval); ALBEF clamps to (0.001, 0.5)
  c.mlm_probability = 0.15
  c.mlm_mask_ratio = 0.8      # of the selected tokens -> [MASK]
  c.mlm_random_ratio = 0.1    # -> a random token; the rest are kept
  c.label_smoothing = 0.0     # classification only
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad `config.objective` key."""
  for key, allowed in (("negatives", NEGATIVES), ("token_mean", TOKEN_MEANS),
                       ("grounding_loss", GROUNDING_LOSSES)):
    config_lib.check(c[key] in allowed, f"objective.{key}", c[key],
                     f"must be one of {allowed}{config_lib.did_you_mean(str(c[key]), allowed)}")
  config_lib.check(isinstance(c.alpha_ramp_steps, int) and c.alpha_ramp_steps >= 0,
                   "objective.alpha_ramp_steps", c.alpha_ramp_steps, "must be an integer >= 0")
  config_lib.check(c.hard_negative_eps >= 0, "objective.hard_negative_eps",
                   c.hard_negative_eps, "must be >= 0")


# --------------------------------------------------------------------------------------
# Local batches.
# --------------------------------------------------------------------------------------


def grouped(x: Array, groups: int) -> Array:
  """(rows, ...) -> (groups, rows / groups, ...): the local batch of each device."""
  if x.shape[0] % groups:
    raise ValueError(f"{x.shape[0]} rows do not split into {groups} local batches "
                     "(config.batch_size / optimizer.accum_steps over the data x fsdp devices)")
  return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


def ramped_alpha(alpha: float, iteration, ramp_steps: int):
  """Official `alpha * min(1, i / len(data_loader))` in epoch 0 (`ramp_steps` iterations)."""
  if not ramp_steps or iteration is None:
    return alpha
  return alpha * jnp.minimum(1.0, jnp.asarray(iteration, jnp.float32) / ramp_steps)


def group_token_mean(token_loss: Array, valid: Array, groups: int) -> Array:
  """Mean of each group's token mean over its valid tokens (groups with none left out):
  PyTorch's default `CrossEntropyLoss` mean on each device, averaged over devices."""
  loss = grouped(token_loss, groups).reshape(groups, -1)
  count = grouped(valid, groups).reshape(groups, -1).sum(axis=1)
  per = loss.sum(axis=1) / jnp.maximum(count, 1)
  has = (count > 0).astype(jnp.float32)
  return jnp.sum(per * has) / jnp.maximum(has.sum(), 1.0)


# --------------------------------------------------------------------------------------
# Task losses with the official reductions (spec section 6).
# --------------------------------------------------------------------------------------


def caption_loss(logits: Array, labels: Array, groups: int = 1) -> Array:
  """Token cross-entropy over the non-ignored targets: a mean per local batch, averaged
  (`BertPrefixModel`: `CrossEntropyLoss()` default mean on each device); groups=1: the
  mean over the whole batch."""
  token_loss, valid = losses.shifted_token_losses(logits, labels)
  return group_token_mean(token_loss, valid, groups)


def answer_sequence_losses(logits: Array, labels: Array) -> Array:
  """Per answer row, the summed token cross-entropy (`BertLMHeadModel`, reduction none)."""
  return losses.shifted_sequence_losses(logits, labels)


def answer_loss(logits: Array, labels: Array, weights: Array, num_questions: int) -> Array:
  """VideoQA: sum_j weights_j * s_j / B (B = number of questions)."""
  return jnp.sum(weights * answer_sequence_losses(logits, labels)) / num_questions


def box_corners(box: Array) -> Array:
  """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
  cx, cy, w, h = (box[..., i] for i in range(4))
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def generalized_iou(a: Array, b: Array) -> Array:
  """Row-wise GIoU of corner boxes (N, 4): IoU - (enclosing area - union) / enclosing area
  (0 where a denominator is 0)."""
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  lo, hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(hi - lo, 0.0), axis=-1)
  union = area(a) + area(b) - inter
  iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  lo, hi = jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:])
  enclosing = jnp.prod(jnp.clip(hi - lo, 0.0), axis=-1)
  return iou - jnp.where(enclosing > 0, (enclosing - union) / jnp.where(enclosing > 0,
                                                                        enclosing, 1.0), 0.0)


def grounding_weights(logits: Array, boxes: Array, first_id: int = BERT_BOX_FIRST_ID,
                      bins: int = BERT_BOX_BINS) -> tuple[Array, Array, Array]:
  """(masked logits (B, 5, V), L1 weights (B, 4), 1 - GIoU (B,)) of M1
  `model_grounding_mplug.py:143-166`: the teacher-forced argmax box (over the box tokens),
  its per-coordinate |error| clamped to [0, 5] and its 1 - GIoU with the target box."""
  vocab = jnp.arange(logits.shape[-1])
  in_box = (vocab >= first_id) & (vocab <= first_id + bins)
  masked = logits.astype(jnp.float32) + jnp.where(in_box, 0.0, BOX_MASK)
  pred = (jnp.argmax(masked[:, :-1], axis=-1) - first_id).astype(jnp.float32) / bins
  boxes = boxes.astype(jnp.float32)
  l1 = jnp.clip(jnp.abs(pred - boxes), 0.0, 5.0)
  giou = 1.0 - generalized_iou(box_corners(pred), box_corners(boxes))
  return masked, jax.lax.stop_gradient(l1), jax.lax.stop_gradient(giou)


def grounding_loss(logits: Array, labels: Array, boxes: Array, mode: str = "official",
                   groups: int = 1, first_id: int = BERT_BOX_FIRST_ID,
                   bins: int = BERT_BOX_BINS) -> Array:
  """Box-token loss of M1 `model_grounding_mplug.py:88-91,143-166`.

  logits (B, 5, V) of the rows [prefix, 4 box tokens], labels (B, 5) (-100 at the prefix),
  boxes (B, 4) the continuous (cx, cy, w, h) targets. Cross-entropy over the logits with
  -10000 added outside the 337 box tokens (`prob_mask`), per token (B, 4), then:
    official    the official expression `loss.view(bs, 1, 4) * l1 * giou.unsqueeze(1)`
                broadcasts to (bs, bs, 4): token (i, c)'s loss meets the weights of every
                row j of the device's batch; its mean is
                mean_c[mean_i ce[i, c] * mean_j (l1[j, c] giou[j])] per local batch
    per_box     each token weighted by its own row's l1 x (1 - GIoU), mean over tokens
    unweighted  mean over tokens
  """
  masked, l1, giou = grounding_weights(logits, boxes, first_id, bins)
  ce, _ = losses.shifted_token_losses(masked, labels)                 # (B, 4)
  if mode == "unweighted":
    return jnp.mean(ce)
  weight = l1 * giou[:, None]
  if mode == "per_box":
    return jnp.mean(ce * weight)
  if mode != "official":
    raise ValueError(f"config.objective.grounding_loss={mode!r}: one of {GROUNDING_LOSSES}")
  per_group = jnp.mean(grouped(ce, groups).mean(axis=1) * grouped(weight, groups).mean(axis=1),
                       axis=-1)
  return jnp.mean(per_group)


# --------------------------------------------------------------------------------------
# Pure loss pieces (tested on hand-checked inputs).
# --------------------------------------------------------------------------------------


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, ids, queue_image, queue_text,
             queue_ids, temp, alpha, groups: int = 1):
  """ITC with momentum distillation and id-based positives (mPLUG/ALBEF).

  Features are L2-normalised (B, E); queues (Q, E) with ids (Q,). Each of the `groups`
  local batches of b = B / groups rows is scored against [its own momentum features ;
  the queue]. Returns (loss = mean over the B rows, (sim_i2t, sim_t2i) (groups, b, b + Q)).
  """
  img, txt = grouped(image_feat, groups), grouped(text_feat, groups)
  img_m, txt_m = grouped(image_feat_m, groups), grouped(text_feat_m, groups)
  ids_g = grouped(ids, groups)

  def sims(query, keys_local, keys_queue):
    local = jnp.einsum("gie,gje->gij", query, keys_local)
    queue = jnp.einsum("gie,qe->giq", query, keys_queue)
    return jnp.concatenate([local, queue], axis=-1) / temp

  all_ids = jnp.concatenate(
      [ids_g, jnp.broadcast_to(queue_ids, (groups,) + queue_ids.shape)], axis=1)
  pos = (ids_g[:, :, None] == all_ids[:, None, :]).astype(jnp.float32)
  targets = pos / pos.sum(axis=-1, keepdims=True)
  sim_i2t, sim_t2i = sims(img, txt_m, queue_text), sims(txt, img_m, queue_image)
  sim_i2t_m = jax.lax.stop_gradient(sims(img_m, txt_m, queue_text))
  sim_t2i_m = jax.lax.stop_gradient(sims(txt_m, img_m, queue_image))
  targets_i2t = alpha * jax.nn.softmax(sim_i2t_m, axis=-1) + (1 - alpha) * targets
  targets_t2i = alpha * jax.nn.softmax(sim_t2i_m, axis=-1) + (1 - alpha) * targets
  loss_i2t = -jnp.mean(jnp.sum(jax.nn.log_softmax(sim_i2t, axis=-1) * targets_i2t, axis=-1))
  loss_t2i = -jnp.mean(jnp.sum(jax.nn.log_softmax(sim_t2i, axis=-1) * targets_t2i, axis=-1))
  return (loss_i2t + loss_t2i) / 2, (sim_i2t, sim_t2i)


def sample_hard_negatives(rng, sim_i2t, sim_t2i, ids, eps: float = 0.0):
  """One negative per row from softmax(in-batch similarities), same-id entries excluded.

  Grouped inputs: sims (G, b, >= b) (the first b columns are the local batch) and ids
  (G, b); returns indices *within* each local batch (G, b). 2-D inputs ((B, >= B), (B,))
  are one group and give (B,) indices. Official (M1 `model_retrieval_mplug.py:84-106`):
  weights softmax(sim[:, :bs]) with same-id entries set to 0, `torch.multinomial`; `eps`
  is added to the weights before the same-id entries are removed. Returns (negative text
  per image, negative image per text, valid per image, valid per text): a row whose whole
  local batch shares its id has no negative, valid = False (`multinomial` would fail).
  """
  flat = sim_i2t.ndim == 2
  if flat:
    sim_i2t, sim_t2i, ids = sim_i2t[None], sim_t2i[None], ids[None]
  b = ids.shape[1]
  same = ids[:, :, None] == ids[:, None, :]
  sim_i2t = jax.lax.stop_gradient(sim_i2t[:, :, :b])
  sim_t2i = jax.lax.stop_gradient(sim_t2i[:, :, :b])

  def sample(key, sim):
    weights = jax.nn.softmax(sim.astype(jnp.float32), axis=-1) + eps
    logits = jnp.where(same, -jnp.inf, jnp.log(weights))
    valid = jnp.any(~same, axis=-1)
    logits = jnp.where(valid[..., None], logits, 0.0)
    return jax.random.categorical(key, logits, axis=-1), valid

  k1, k2 = jax.random.split(rng)
  neg_text, valid_i = sample(k1, sim_i2t)
  neg_image, valid_t = sample(k2, sim_t2i)
  out = (neg_text, neg_image, valid_i, valid_t)
  return tuple(x[0] for x in out) if flat else out


def mask_tokens(rng, ids, mask, vocab_size, probability=0.15, mask_ratio=0.8,
                random_ratio=0.1):
  """BERT masking: (masked ids, labels with -100 on unselected positions).

  Selectable: real tokens except [CLS] / [PAD]. Selected -> [MASK] (mask_ratio), a random
  token (random_ratio), kept (the rest).
  """
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  selectable = (mask > 0) & (ids != CLS_ID) & (ids != PAD_ID)
  selected = selectable & (jax.random.uniform(k_sel, ids.shape) < probability)
  u = jax.random.uniform(k_kind, ids.shape)
  to_mask = selected & (u < mask_ratio)
  to_random = selected & (u >= mask_ratio) & (u < mask_ratio + random_ratio)
  random_ids = jax.random.randint(k_tok, ids.shape, 0, vocab_size, ids.dtype)
  out = jnp.where(to_mask, MASK_ID, jnp.where(to_random, random_ids, ids))
  labels = jnp.where(selected, ids, IGNORE_INDEX)
  return out, labels


def mlm_loss(logits, labels, groups: int = 1, soft_logits=None, alpha=0.0):
  """Masked-LM loss: token mean per local batch (FusionForMaskedLM `CrossEntropyLoss()`),
  averaged; with `soft_logits` (momentum model) the ALBEF distillation
  (1 - alpha) CE + alpha * mean over the masked tokens of -sum softmax(soft) log_softmax."""
  ce, valid = losses.token_losses(logits, labels)
  loss = group_token_mean(ce, valid, groups)
  if soft_logits is None:
    return loss
  soft = jax.nn.softmax(jax.lax.stop_gradient(soft_logits).astype(jnp.float32), axis=-1)
  distill = -jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) * soft, axis=-1)
  distill = group_token_mean(jnp.where(valid, distill, 0.0), valid, groups)
  return (1 - alpha) * loss + alpha * distill


def classification_loss(logits, labels, smoothing=0.0):
  num = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num) * (1 - smoothing) + smoothing / num
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32)) * onehot, axis=-1))


def itm_loss(logits, labels, weights):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return jnp.sum(nll * weights) / jnp.maximum(weights.sum(), 1.0)


def lm_labels(ids, mask):
  return jnp.where(mask > 0, ids, IGNORE_INDEX)


# --------------------------------------------------------------------------------------
# Forwards composed from the model's building blocks (run inside `model.apply`).
# --------------------------------------------------------------------------------------


def _momentum_forward(module, video, text_ids, text_mask, masked_ids=None):
  """Momentum ITC features, and with `masked_ids` the momentum MLM logits."""
  image, _ = module.embed_image(video)
  text, _ = module.embed_text(text_ids, text_mask)
  image_feat, text_feat, _ = module.itc_features(image, text)
  if masked_ids is None:
    return image_feat, text_feat, None
  masked, _ = module.embed_text(masked_ids, text_mask)
  _, fused = module.fuse(image, jnp.ones(image.shape[:2], jnp.int32), masked, text_mask)
  return image_feat, text_feat, module.mlm_logits(fused)


def _pick(x, index):
  """Rows `index` (G, b) of each local batch of x (G, b, ...), a batch-dim gather."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _itc_itm_mlm(module, batch, feats_m, queues, rngs, c, task, alpha, shards, mlm):
  """Retrieval / image-text pre-training forward: returns {loss name: value}, aux."""
  out, aux = {}, {}
  video, ids, mask = batch["video"], batch["text_ids"], batch["text_mask"]
  image, _ = module.embed_image(video)
  image_mask = jnp.ones(image.shape[:2], jnp.int32)
  text, _ = module.embed_text(ids, mask)
  image_feat, text_feat, temp = module.itc_features(image, text)
  if c.temp_range:
    temp = jnp.clip(temp, *c.temp_range)
  aux["temp"] = temp
  pair_ids = batch["image_ids"]
  image_feat_m, text_feat_m, mlm_logits_m = feats_m
  if queues:
    qi, qt, qids = queues["image"], queues["text"], queues["ids"]
  else:  # no queue: the momentum features of the batch are the only keys
    qi = qt = jnp.zeros((0, image_feat.shape[-1]), image_feat.dtype)
    qids = jnp.zeros((0,), pair_ids.dtype)
  groups = shards if c.negatives == "local" else 1
  out["itc"], (sim_i2t, sim_t2i) = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                            pair_ids, qi, qt, qids, temp, alpha, groups)

  # ITM: per local batch, b positives + b (image, hard-negative text) + b (hard-negative
  # image, text), the rows kept group-major so each device fuses its own 3 b pairs.
  neg_text, neg_image, valid_i, valid_t = sample_hard_negatives(
      rngs["itm"], sim_i2t, sim_t2i, grouped(pair_ids, groups), c.hard_negative_eps)
  image_g, text_g, mask_g = (grouped(x, groups) for x in (image, text, mask))
  rows = lambda a, b_, c_: jnp.stack([a, b_, c_], axis=1).reshape(-1, *a.shape[2:])
  images = rows(image_g, image_g, _pick(image_g, neg_image))
  texts = rows(text_g, _pick(text_g, neg_text), text_g)
  text_masks = rows(mask_g, _pick(mask_g, neg_text), mask_g)
  _, fused_text = module.fuse(images, jnp.ones(images.shape[:2], jnp.int32), texts, text_masks)
  ones = jnp.ones(neg_text.shape, jnp.float32)
  itm_labels = rows(ones, 0 * ones, 0 * ones).astype(jnp.int32)
  itm_weights = rows(ones, valid_i.astype(jnp.float32), valid_t.astype(jnp.float32))
  out["itm"] = itm_loss(module.itm_logits(fused_text), itm_labels, itm_weights)
  aux["itm_negatives"] = (neg_text, neg_image)

  if task == "pretrain":
    # MLM on the fusion output of (image, masked text) (FusionForMaskedLM).
    tgroups = shards if c.token_mean == "device" else 1
    masked, labels = mlm
    masked_text, _ = module.embed_text(masked, mask)
    _, fused_masked = module.fuse(image, image_mask, masked_text, mask)
    out["mlm"] = mlm_loss(module.mlm_logits(fused_masked), labels, tgroups, mlm_logits_m,
                          alpha)
    # Prefix-LM / captioning: the decoder generates the caption conditioned on the image;
    # official targets `prompt + caption + [SEP]` with the prompt masked out
    # (data.pretrain_lm_targets="caption"), else `[CLS] text`.
    if "caption_ids" in batch:
      lm_ids, lm_mask, labels = batch["caption_ids"], batch["caption_mask"], batch["caption_labels"]
    else:
      lm_ids, lm_mask, labels = ids, mask, lm_labels(ids, mask)
    logits, _ = module.decode(lm_ids, lm_mask, image, image_mask)
    out["lm"] = caption_loss(logits, labels, tgroups)
  return out, aux


def _text_only(module, batch, c, shards, mlm):
  masked, labels = mlm
  text, _ = module.embed_text(masked, batch["text_mask"])
  groups = shards if c.token_mean == "device" else 1
  return {"mlm": mlm_loss(module.mlm_logits(text), labels, groups)}, {}


def _forward(module, batch, feats_m, queues, rngs, c, alpha, shards, mlm):
  """All losses of `module.config.task` for one (micro-)batch: ({name: loss}, aux)."""
  task = module.config.task
  tgroups = shards if c.token_mean == "device" else 1
  if task == "caption":
    out, _ = module(batch)
    return {"caption": caption_loss(out["logits"], batch["caption_labels"], tgroups)}, {}
  if task == "videoqa":
    out, _ = module(batch)
    weights = batch.get("answer_weights")
    if weights is None:
      weights = jnp.ones(batch["answer_ids"].shape[0], jnp.float32)
    return {"answer": answer_loss(out["logits"], batch["answer_labels"], weights,
                                  batch["video"].shape[0])}, {}
  if task == "grounding":
    out, _ = module(batch)
    return {"box": grounding_loss(out["logits"], batch["answer_labels"], batch["boxes"],
                                  c.grounding_loss, shards)}, {}
  if task == "classification":
    logits = module.classify(batch["video"])
    return {"class": classification_loss(logits, batch["labels"], c.label_smoothing)}, {}
  if task in ITC_TASKS:
    if "video" not in batch:
      return _text_only(module, batch, c, shards, mlm)
    return _itc_itm_mlm(module, batch, feats_m, queues, rngs, c, task, alpha, shards, mlm)
  raise ValueError(f"no objective for task {task!r}")


def uses_momentum(task: str) -> bool:
  return task in ITC_TASKS


def momentum_modules(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  return MOMENTUM_MODULES + (MLM_MOMENTUM_MODULES if c.get("mlm_distill", False) else ())


def momentum_subset(params: dict, names=MOMENTUM_MODULES) -> dict:
  return {k: v for k, v in params.items() if k in names}


def loss(model, params, extra: dict, batch: dict, rng, c: ml_collections.ConfigDict, *,
         iteration=None, shards: int = 1):
  """(total loss, (metrics, enqueued)) for one (micro-)batch.

  `model` is built with deterministic=False (dropout on). `extra["ema"]` holds the
  momentum parameters already updated for this step (official: EMA update, then the
  momentum forward, both without gradients). `iteration` (the micro-batch's index in the
  run; None = after the ramp) drives the distillation ramp, `shards` is the number of
  local batches (module docstring). `enqueued` is what `after_update` writes into the
  queues ({"image", "text", "ids"}, rows = this batch), or None.
  """
  k_drop, k_drop_m, k_itm, k_mlm = jax.random.split(rng, 4)
  task = model.config.task
  alpha = ramped_alpha(c.alpha, iteration, int(c.alpha_ramp_steps))
  mlm = None
  if task == "pretrain":
    mlm = mask_tokens(k_mlm, batch["text_ids"], batch["text_mask"], model.config.text.vocab_size,
                      c.mlm_probability, c.mlm_mask_ratio, c.mlm_random_ratio)
  feats_m = None
  if uses_momentum(task) and "video" in batch:
    masked_ids = mlm[0] if (mlm is not None and c.mlm_distill) else None
    feats_m = jax.lax.stop_gradient(model.apply(
        {"params": extra["ema"]}, batch["video"], batch["text_ids"], batch["text_mask"],
        masked_ids, method=_momentum_forward, rngs={"dropout": k_drop_m}))
  parts, aux = model.apply({"params": params}, batch, feats_m, extra.get("queues", {}),
                           {"itm": k_itm}, c, alpha, shards, mlm, method=_forward,
                           rngs={"dropout": k_drop})
  weights = c.loss_weights
  total = sum(parts[k] * (weights[k] if k in weights else 1.0) for k in parts)
  metrics = {f"loss/{k}": v for k, v in parts.items()}
  metrics["loss"] = total
  if "temp" in aux:
    metrics["temp"] = aux["temp"]
  if feats_m is not None:
    metrics["alpha"] = jnp.asarray(alpha, jnp.float32)
  enqueued = None
  if feats_m is not None:
    enqueued = {"image": feats_m[0], "text": feats_m[1], "ids": batch["image_ids"]}
  return total, (metrics, enqueued)


# --------------------------------------------------------------------------------------
# State kept between steps: the momentum model and the ITC queues.
# --------------------------------------------------------------------------------------


def init_extra(rng, params: dict, model_cfg: ml_collections.ConfigDict,
               c: ml_collections.ConfigDict) -> dict:
  """{"ema": momentum copy of the ITC feature path, "queues": ...} for ITC tasks, else {}."""
  if not uses_momentum(model_cfg.task):
    return {}
  extra = {"ema": jax.tree.map(jnp.copy, momentum_subset(params, momentum_modules(c)))}
  queues = init_queues(rng, int(c.queue_size), int(model_cfg.embed_dim))
  if queues:
    extra["queues"] = queues
  return extra


def reset_momentum(extra: dict, params: dict) -> dict:
  """The momentum model restarted as a copy of `params` (after loading initial weights)."""
  if "ema" not in extra:
    return extra
  return dict(extra, ema=jax.tree.map(jnp.copy, momentum_subset(params, tuple(extra["ema"]))))


def before_update(extra: dict, params: dict, c: ml_collections.ConfigDict) -> dict:
  """ema <- m ema + (1 - m) params (official: before the momentum forward)."""
  if "ema" not in extra:
    return extra
  m = float(c.momentum)
  ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, extra["ema"],
                     momentum_subset(params, tuple(extra["ema"])))
  return dict(extra, ema=ema)


def after_update(extra: dict, enqueued: dict | None) -> dict:
  """Queues <- the global batch of momentum features (after the optimizer update)."""
  if enqueued is None or "queues" not in extra:
    return extra
  return dict(extra, queues=enqueue(extra["queues"], enqueued["image"], enqueued["text"],
                                    enqueued["ids"]))


# --------------------------------------------------------------------------------------
# Queues.
# --------------------------------------------------------------------------------------


def init_queues(rng, size: int, dim: int) -> dict:
  """Official init: random unit features, ids -100 (never a positive), pointer 0.

  `size` 0: no queue ({}; ITC over the global batch only). Nothing zero-sized is stored,
  since checkpoints cannot hold zero-size arrays."""
  if not size:
    return {}
  k1, k2 = jax.random.split(rng)
  unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True))(
      jax.random.normal(k, (size, dim), jnp.float32))
  return {"image": unit(k1), "text": unit(k2), "ids": jnp.full((size,), -100, jnp.int32),
          "ptr": jnp.zeros((), jnp.int32)}


def enqueue(queues: dict, image_feat, text_feat, ids) -> dict:
  """Writes the global batch of momentum features at `ptr` (size % batch == 0)."""
  if not queues:
    return queues
  size = queues["ids"].shape[0]
  ptr = queues["ptr"]
  upd = lambda q, x: jax.lax.dynamic_update_slice_in_dim(q, x.astype(q.dtype), ptr, axis=0)
  return {"image": upd(queues["image"], image_feat), "text": upd(queues["text"], text_feat),
          "ids": upd(queues["ids"], ids), "ptr": (ptr + ids.shape[0]) % size}
