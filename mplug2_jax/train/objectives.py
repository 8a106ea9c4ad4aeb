"""Per-task training objectives on the mPLUG-2 model.

Spec: `shared/spec/mplug2.md` sections 6 (task losses) and 13 (pre-training: ITC with a
momentum model and feature queues, ITM with hard negatives, MLM, prefix-LM).

  caption         decoder CE over non-ignored tokens (prompt masked by the data)
  videoqa         per-answer summed CE, weighted, / number of questions
  grounding       as videoqa: the box is given as answer tokens by the data
  classification  softmax cross-entropy (optional label smoothing)
  retrieval       ITC (momentum + queues) + ITM (hard negatives)
  pretrain        ITC + ITM + MLM (on the fusion output) + prefix-LM (decoder captioning);
                  a batch without "video" (text-only corpus) trains MLM on the text encoder

Global batch: the train step is one `jax.jit` over global arrays sharded along the batch
axis, so the ITC similarity matrix below is computed over the *global* batch as written —
XLA inserts the collectives (the all-gather of the official `concat_all_gather`) itself.
Likewise the queues are updated with the global batch of momentum features.

`compute(...)` returns (loss, (metrics, momentum_features)); momentum features are the
keys/ids the step enqueues after the optimizer update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mplug2_jax.models import mplug2
from mplug2_jax.train import losses

Array = Any

CLS_ID, SEP_ID, MASK_ID, PAD_ID = 101, 102, 103, 0
# Modules of the momentum (EMA) model: the ITC feature path (official `model_pairs`).
MOMENTUM_MODULES = ("vision", "visn_fc", "visn_layer_norm", "visn_emb_norm", "text_encoder",
                    "itc_head")
ITC_TASKS = ("retrieval", "pretrain")


def default_objective_config() -> ml_collections.ConfigDict:
  """`config.objective`: every key this module reads."""
  c = ml_collections.ConfigDict()
  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, mlm=1.0, lm=1.0))
  c.queue_size = 65536        # ITC feature queue (a multiple of the global batch); 0 = none
  c.momentum = 0.995          # EMA of the momentum model
  c.alpha = 0.4               # ITC distillation weight of the momentum similarities
  c.temp_range = ()           # (min, max) clamp of the learnable temperature; () = none
                              # (mPLUG retrieval); ALBEF clamps to (0.001, 0.5)
  c.mlm_probability = 0.15
  c.mlm_mask_ratio = 0.8      # of the selected tokens -> [MASK]
  c.mlm_random_ratio = 0.1    # -> a random token; the rest are kept
  c.label_smoothing = 0.0     # classification only
  return c


# --------------------------------------------------------------------------------------
# Pure loss pieces (tested on hand-checked inputs).
# --------------------------------------------------------------------------------------


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, ids, queue_image, queue_text,
             queue_ids, temp, alpha):
  """ITC with momentum distillation and id-based positives (mPLUG/ALBEF).

  Features are L2-normalised (B, E); queues (Q, E) with ids (Q,). Returns (loss, sims).
  """
  keys_image = jnp.concatenate([image_feat_m, queue_image], axis=0)   # (B+Q, E)
  keys_text = jnp.concatenate([text_feat_m, queue_text], axis=0)
  all_ids = jnp.concatenate([ids, queue_ids], axis=0)
  pos = (ids[:, None] == all_ids[None, :]).astype(jnp.float32)
  targets = pos / pos.sum(axis=1, keepdims=True)
  sim_i2t = image_feat @ keys_text.T / temp
  sim_t2i = text_feat @ keys_image.T / temp
  sim_i2t_m = jax.lax.stop_gradient(image_feat_m @ keys_text.T / temp)
  sim_t2i_m = jax.lax.stop_gradient(text_feat_m @ keys_image.T / temp)
  targets_i2t = alpha * jax.nn.softmax(sim_i2t_m, axis=1) + (1 - alpha) * targets
  targets_t2i = alpha * jax.nn.softmax(sim_t2i_m, axis=1) + (1 - alpha) * targets
  loss_i2t = -jnp.mean(jnp.sum(jax.nn.log_softmax(sim_i2t, axis=1) * targets_i2t, axis=1))
  loss_t2i = -jnp.mean(jnp.sum(jax.nn.log_softmax(sim_t2i, axis=1) * targets_t2i, axis=1))
  return (loss_i2t + loss_t2i) / 2, (sim_i2t, sim_t2i)


def sample_hard_negatives(rng, sim_i2t, sim_t2i, ids):
  """One negative per row from softmax(in-batch similarities), same-id entries excluded.

  Returns (negative text index per image, negative image index per text, valid per image,
  valid per text). A row whose whole batch shares its id has no negative: valid = False
  (the official `torch.multinomial` would fail there).
  """
  batch = ids.shape[0]
  same = ids[:, None] == ids[None, :]
  sim_i2t, sim_t2i = jax.lax.stop_gradient(sim_i2t[:, :batch]), jax.lax.stop_gradient(sim_t2i[:, :batch])

  def sample(key, sim):
    weights = jax.nn.softmax(sim.astype(jnp.float32), axis=1) + 1e-5   # official +1e-5
    logits = jnp.where(same, -jnp.inf, jnp.log(weights))
    valid = jnp.any(~same, axis=1)
    logits = jnp.where(valid[:, None], logits, 0.0)
    return jax.random.categorical(key, logits, axis=1), valid

  k1, k2 = jax.random.split(rng)
  neg_text, valid_i = sample(k1, sim_i2t)
  neg_image, valid_t = sample(k2, sim_t2i)
  return neg_text, neg_image, valid_i, valid_t


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
  labels = jnp.where(selected, ids, losses.IGNORE)
  return out, labels


def token_ce(logits, labels):
  """Mean CE over positions with label != -100 (no shift: MLM)."""
  valid = labels != losses.IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(valid.sum(), 1)


def classification_loss(logits, labels, smoothing=0.0):
  num = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num) * (1 - smoothing) + smoothing / num
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32)) * onehot, axis=-1))


def itm_loss(logits, labels, weights):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return jnp.sum(nll * weights) / jnp.maximum(weights.sum(), 1.0)


def lm_labels(ids, mask):
  return jnp.where(mask > 0, ids, losses.IGNORE)


# --------------------------------------------------------------------------------------
# Forwards composed from the model's building blocks (run inside `model.apply`).
# --------------------------------------------------------------------------------------


def _momentum_features(module: mplug2.Mplug2, video, text_ids, text_mask):
  image, _ = module.embed_image(video)
  text, _ = module.embed_text(text_ids, text_mask)
  image_feat, text_feat, _ = module.itc_features(image, text)
  return image_feat, text_feat


def _itc_itm_mlm(module: mplug2.Mplug2, batch, feats_m, queues, rngs, c, task):
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
  image_feat_m, text_feat_m = feats_m
  if queues:
    qi, qt, qids = queues["image"], queues["text"], queues["ids"]
  else:  # no queue: the momentum features of the batch are the only keys
    qi = qt = jnp.zeros((0, image_feat.shape[-1]), image_feat.dtype)
    qids = jnp.zeros((0,), pair_ids.dtype)
  out["itc"], (sim_i2t, sim_t2i) = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                            pair_ids, qi, qt, qids, temp, c.alpha)

  # ITM: B positives + B (image, hard-negative text) + B (hard-negative image, text).
  neg_text, neg_image, valid_i, valid_t = sample_hard_negatives(rngs["itm"], sim_i2t,
                                                                 sim_t2i, pair_ids)
  images = jnp.concatenate([image, image, image[neg_image]], axis=0)
  texts = jnp.concatenate([text, text[neg_text], text], axis=0)
  text_masks = jnp.concatenate([mask, mask[neg_text], mask], axis=0)
  _, fused_text = module.fuse(images, jnp.ones(images.shape[:2], jnp.int32), texts, text_masks)
  batch_size = ids.shape[0]
  itm_labels = jnp.concatenate([jnp.ones(batch_size, jnp.int32),
                                jnp.zeros(2 * batch_size, jnp.int32)])
  itm_weights = jnp.concatenate([jnp.ones(batch_size), valid_i.astype(jnp.float32),
                                 valid_t.astype(jnp.float32)])
  out["itm"] = itm_loss(module.itm_logits(fused_text), itm_labels, itm_weights)
  aux["itm_negatives"] = (neg_text, neg_image)

  if task == "pretrain":
    # MLM on the fusion output of (image, masked text) (FusionForMaskedLM).
    vocab = module.config.text.vocab_size
    masked, labels = mask_tokens(rngs["mlm"], ids, mask, vocab, c.mlm_probability,
                                 c.mlm_mask_ratio, c.mlm_random_ratio)
    masked_text, _ = module.embed_text(masked, mask)
    _, fused_masked = module.fuse(image, image_mask, masked_text, mask)
    out["mlm"] = token_ce(module.mlm_logits(fused_masked), labels)
    # Prefix-LM / captioning: the decoder generates the text conditioned on the image
    # (a prompt, if any, is masked out by the data's `caption_labels`).
    labels = batch.get("caption_labels", lm_labels(ids, mask))
    logits, _ = module.decode(ids, mask, image, image_mask)
    out["lm"] = losses.caption_loss(logits, labels)
  return out, aux


def _text_only(module: mplug2.Mplug2, batch, rngs, c):
  ids, mask = batch["text_ids"], batch["text_mask"]
  masked, labels = mask_tokens(rngs["mlm"], ids, mask, module.config.text.vocab_size,
                               c.mlm_probability, c.mlm_mask_ratio, c.mlm_random_ratio)
  text, _ = module.embed_text(masked, mask)
  return {"mlm": token_ce(module.mlm_logits(text), labels)}, {}


def _forward(module: mplug2.Mplug2, batch, feats_m, queues, rngs, c):
  """All losses of `module.config.task` for one (micro-)batch: ({name: loss}, aux)."""
  task = module.config.task
  if task == "caption":
    out, _ = module(batch)
    return {"caption": losses.caption_loss(out["logits"], batch["caption_labels"])}, {}
  if task in ("videoqa", "grounding"):
    out, _ = module(batch)
    weights = batch.get("answer_weights")
    if weights is None:
      weights = jnp.ones(batch["answer_ids"].shape[0], jnp.float32)
    return {"answer": losses.answer_loss(out["logits"], batch["answer_labels"], weights,
                                         batch["video"].shape[0])}, {}
  if task == "classification":
    logits = module.classify(batch["video"])
    return {"class": classification_loss(logits, batch["labels"], c.label_smoothing)}, {}
  if task in ITC_TASKS:
    if "video" not in batch:
      return _text_only(module, batch, rngs, c)
    return _itc_itm_mlm(module, batch, feats_m, queues, rngs, c, task)
  raise ValueError(f"no objective for task {task!r}")


WEIGHT_OF = {"itc": "itc", "itm": "itm", "mlm": "mlm", "lm": "lm"}


def uses_momentum(task: str) -> bool:
  return task in ITC_TASKS


def momentum_subset(params: dict) -> dict:
  return {k: v for k, v in params.items() if k in MOMENTUM_MODULES}


def compute(model: mplug2.Mplug2, params, ema_params, queues, batch, rng,
            c: ml_collections.ConfigDict):
  """(total loss, (metrics, momentum features)) for one (micro-)batch.

  `model` is built with deterministic=False (dropout on). `ema_params` are the momentum
  parameters already updated for this step (official: EMA update, then the momentum
  forward, both without gradients).
  """
  k_drop, k_drop_m, k_itm, k_mlm = jax.random.split(rng, 4)
  task = model.config.task
  feats_m = None
  if uses_momentum(task) and "video" in batch:
    feats_m = jax.lax.stop_gradient(model.apply(
        {"params": ema_params}, batch["video"], batch["text_ids"], batch["text_mask"],
        method=_momentum_features, rngs={"dropout": k_drop_m}))
  parts, aux = model.apply({"params": params}, batch, feats_m, queues,
                           {"itm": k_itm, "mlm": k_mlm}, c, method=_forward,
                           rngs={"dropout": k_drop})
  weights = c.loss_weights
  total = sum(parts[k] * (weights[k] if k in weights else 1.0) for k in parts)
  metrics = {f"loss/{k}": v for k, v in parts.items()}
  metrics["loss"] = total
  if "temp" in aux:
    metrics["temp"] = aux["temp"]
  return total, (metrics, feats_m)


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
