"""mPLUG-2 training objectives: the loss of each task, and the momentum model and ITC
queues the retrieval and pre-training objectives keep between steps.

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

The generic train step (`train/step.py`) calls, per optimizer step:
  extra = before_update(extra, params, c)        EMA of the momentum model
  loss, (metrics, enqueued) = loss(model, params, extra, batch, rng, c)
  extra = after_update(extra, enqueued)          queues <- momentum features
where `extra` is `init_extra(...)` ({} for tasks without ITC): the state this family's
objectives keep beside the parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import losses
from mplug2_jax.tokens import BERT_CLS_ID as CLS_ID, BERT_MASK_ID as MASK_ID
from mplug2_jax.tokens import BERT_PAD_ID as PAD_ID, IGNORE_INDEX

Array = Any

# Modules of the momentum (EMA) model: the ITC feature path (official `model_pairs`).
MOMENTUM_MODULES = ("vision", "visn_fc", "visn_layer_norm", "visn_emb_norm", "text_encoder",
                    "itc_head")
ITC_TASKS = ("retrieval", "pretrain")


def default_config() -> ml_collections.ConfigDict:
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
# Task losses with the official reductions (spec section 6).
# --------------------------------------------------------------------------------------


def caption_loss(logits: Array, labels: Array) -> Array:
  """Mean token cross-entropy over every non-ignored target of the batch
  (`BertPrefixModel`: `CrossEntropyLoss()` default mean, whatever the caller asks)."""
  return losses.shifted_mean_loss(logits, labels)


def answer_sequence_losses(logits: Array, labels: Array) -> Array:
  """Per answer row, the summed token cross-entropy (`BertLMHeadModel`, reduction none)."""
  return losses.shifted_sequence_losses(logits, labels)


def answer_loss(logits: Array, labels: Array, weights: Array, num_questions: int) -> Array:
  """VideoQA: sum_j weights_j * s_j / B (B = number of questions)."""
  return jnp.sum(weights * answer_sequence_losses(logits, labels)) / num_questions


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
  labels = jnp.where(selected, ids, IGNORE_INDEX)
  return out, labels


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


def _momentum_features(module, video, text_ids, text_mask):
  image, _ = module.embed_image(video)
  text, _ = module.embed_text(text_ids, text_mask)
  image_feat, text_feat, _ = module.itc_features(image, text)
  return image_feat, text_feat


def _itc_itm_mlm(module, batch, feats_m, queues, rngs, c, task):
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
    out["mlm"] = losses.token_mean_loss(module.mlm_logits(fused_masked), labels)
    # Prefix-LM / captioning: the decoder generates the text conditioned on the image
    # (a prompt, if any, is masked out by the data's `caption_labels`).
    labels = batch.get("caption_labels", lm_labels(ids, mask))
    logits, _ = module.decode(ids, mask, image, image_mask)
    out["lm"] = caption_loss(logits, labels)
  return out, aux


def _text_only(module, batch, rngs, c):
  ids, mask = batch["text_ids"], batch["text_mask"]
  masked, labels = mask_tokens(rngs["mlm"], ids, mask, module.config.text.vocab_size,
                               c.mlm_probability, c.mlm_mask_ratio, c.mlm_random_ratio)
  text, _ = module.embed_text(masked, mask)
  return {"mlm": losses.token_mean_loss(module.mlm_logits(text), labels)}, {}


def _forward(module, batch, feats_m, queues, rngs, c):
  """All losses of `module.config.task` for one (micro-)batch: ({name: loss}, aux)."""
  task = module.config.task
  if task == "caption":
    out, _ = module(batch)
    return {"caption": caption_loss(out["logits"], batch["caption_labels"])}, {}
  if task in ("videoqa", "grounding"):
    out, _ = module(batch)
    weights = batch.get("answer_weights")
    if weights is None:
      weights = jnp.ones(batch["answer_ids"].shape[0], jnp.float32)
    return {"answer": answer_loss(out["logits"], batch["answer_labels"], weights,
                                         batch["video"].shape[0])}, {}
  if task == "classification":
    logits = module.classify(batch["video"])
    return {"class": classification_loss(logits, batch["labels"], c.label_smoothing)}, {}
  if task in ITC_TASKS:
    if "video" not in batch:
      return _text_only(module, batch, rngs, c)
    return _itc_itm_mlm(module, batch, feats_m, queues, rngs, c, task)
  raise ValueError(f"no objective for task {task!r}")


def uses_momentum(task: str) -> bool:
  return task in ITC_TASKS


def momentum_subset(params: dict) -> dict:
  return {k: v for k, v in params.items() if k in MOMENTUM_MODULES}


def loss(model, params, extra: dict, batch: dict, rng, c: ml_collections.ConfigDict):
  """(total loss, (metrics, enqueued)) for one (micro-)batch.

  `model` is built with deterministic=False (dropout on). `extra["ema"]` holds the
  momentum parameters already updated for this step (official: EMA update, then the
  momentum forward, both without gradients). `enqueued` is what `after_update` writes into
  the queues ({"image", "text", "ids"}, rows = this batch), or None.
  """
  k_drop, k_drop_m, k_itm, k_mlm = jax.random.split(rng, 4)
  task = model.config.task
  feats_m = None
  if uses_momentum(task) and "video" in batch:
    feats_m = jax.lax.stop_gradient(model.apply(
        {"params": extra["ema"]}, batch["video"], batch["text_ids"], batch["text_mask"],
        method=_momentum_features, rngs={"dropout": k_drop_m}))
  parts, aux = model.apply({"params": params}, batch, feats_m, extra.get("queues", {}),
                           {"itm": k_itm, "mlm": k_mlm}, c, method=_forward,
                           rngs={"dropout": k_drop})
  weights = c.loss_weights
  total = sum(parts[k] * (weights[k] if k in weights else 1.0) for k in parts)
  metrics = {f"loss/{k}": v for k, v in parts.items()}
  metrics["loss"] = total
  if "temp" in aux:
    metrics["temp"] = aux["temp"]
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
  extra = {"ema": jax.tree.map(jnp.copy, momentum_subset(params))}
  queues = init_queues(rng, int(c.queue_size), int(model_cfg.embed_dim))
  if queues:
    extra["queues"] = queues
  return extra


def reset_momentum(extra: dict, params: dict) -> dict:
  """The momentum model restarted as a copy of `params` (after loading initial weights)."""
  if "ema" not in extra:
    return extra
  return dict(extra, ema=jax.tree.map(jnp.copy, momentum_subset(params)))


def before_update(extra: dict, params: dict, c: ml_collections.ConfigDict) -> dict:
  """ema <- m ema + (1 - m) params (official: before the momentum forward)."""
  if "ema" not in extra:
    return extra
  m = float(c.momentum)
  ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, extra["ema"], momentum_subset(params))
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
