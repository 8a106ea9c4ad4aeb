"""Training core: objectives on hand-checked inputs, optimizer groups, the sharded step,
exact resume, restore onto another mesh, the NaN guard, SIGTERM save, retention.

One train step is compiled per module (retrieval: ITC + queues + momentum model + ITM);
every step test reuses it. Slower whole-task checks are marked `slow`.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax import config_lib, experiment, sharding
from mplug2_jax.layers import losses
from mplug2_jax.models import mplug2
from mplug2_jax.models.mplug2 import objectives
from mplug2_jax.train import checkpointing, optimizer, state as state_lib, step as step_lib
from conftest import REPO, dummy_batch

B = 8
L = 6


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def tiny_config(task, mesh=(1, 1, 1), **opt):
  config = experiment.base_config("tiny", task)
  config.model.num_frames = 1
  config.model.num_classes = 5 if task == "classification" else 0
  config.mesh.shape = mesh
  config.batch_size = B
  config.total_steps = 20
  config.optimizer = optimizer.default_optimizer_config()
  config.optimizer.update(dict(lr=1e-3, warmup_steps=2, warmup_lr=1e-4, min_lr=1e-5), **opt)
  config.objective = objectives.default_config()
  config.objective.queue_size = 2 * B
  return config


def synthetic_batch(config, seed):
  """Random inputs of the pipeline's batch format for `config.model.task`."""
  rng = np.random.default_rng(seed)
  m = config.model
  batch = {k: np.asarray(v) for k, v in dummy_batch(m, B, L).items()}
  batch["video"] = rng.normal(size=batch["video"].shape).astype(np.float32)
  for key in ("text_ids", "caption_ids", "answer_ids"):
    if key in batch:
      ids = rng.integers(104, m.text.vocab_size, batch[key].shape).astype(np.int32)
      ids[:, 0] = 101
      mask = np.ones_like(ids)
      mask[::2, L - 2:] = 0
      batch[key] = np.where(mask > 0, ids, 0).astype(np.int32)
      batch[key.replace("_ids", "_mask")] = mask
      batch[key.replace("_ids", "_labels")] = np.where(mask > 0, ids, -100).astype(np.int32)
  if "text_ids" in batch:
    batch["image_ids"] = np.array([0, 1, 2, 3, 0, 5, 6, 5], np.int32)  # duplicates
  if "answer_ids" in batch:
    batch["answer_weights"] = np.ones(B, np.float32)
  if m.task == "classification":
    batch["labels"] = rng.integers(0, m.num_classes, B).astype(np.int32)
  return batch


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


class FakeIterator:
  """Deterministic batches with get_state / set_state (the iterator protocol we save)."""

  def __init__(self, config):
    self.config, self.position = config, 0

  def __next__(self):
    batch = synthetic_batch(self.config, 1000 + self.position)
    self.position += 1
    return batch

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


# --------------------------------------------------------------------------------------
# Objectives on hand-checked inputs.
# --------------------------------------------------------------------------------------


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_itc(img, txt, img_m, txt_m, ids, qi, qt, qids, temp, alpha):
  def log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))

  def softmax(x):
    return np.exp(log_softmax(x))

  all_ids = np.concatenate([ids, qids])
  pos = (ids[:, None] == all_ids[None]).astype(np.float64)
  tgt = pos / pos.sum(1, keepdims=True)
  kt, ki = np.concatenate([txt_m, qt]), np.concatenate([img_m, qi])
  s_i2t, s_t2i = img @ kt.T / temp, txt @ ki.T / temp
  t_i2t = alpha * softmax(img_m @ kt.T / temp) + (1 - alpha) * tgt
  t_t2i = alpha * softmax(txt_m @ ki.T / temp) + (1 - alpha) * tgt
  l1 = -(log_softmax(s_i2t) * t_i2t).sum(1).mean()
  l2 = -(log_softmax(s_t2i) * t_t2i).sum(1).mean()
  return (l1 + l2) / 2


def test_itc_loss_equals_numpy_reimplementation():
  rng = np.random.default_rng(0)
  e, q = 6, 8
  feats = [_unit(rng.normal(size=(4, e))) for _ in range(4)]
  qi, qt = _unit(rng.normal(size=(q, e))), _unit(rng.normal(size=(q, e)))
  ids = np.array([0, 1, 0, 3])
  qids = np.array([-100, 1, 7, 0, -100, 9, 9, 2])  # queue entries sharing ids are positives
  for alpha in (0.0, 0.4):
    got, _ = objectives.itc_loss(*[jnp.asarray(f, jnp.float32) for f in feats], ids, qi, qt,
                                 qids, 0.07, alpha)
    want = _np_itc(*feats, ids, qi, qt, qids, 0.07, alpha)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_itm_hard_negatives_are_never_positives():
  ids = jnp.array([0, 1, 0, 3, 4, 4, 6, 7])
  rng = np.random.default_rng(1)
  sim = jnp.asarray(rng.normal(size=(8, 8 + 5)) * 5, jnp.float32)
  sample = jax.jit(objectives.sample_hard_negatives)
  seen = set()
  for seed in range(30):
    neg_t, neg_i, vi, vt = sample(jax.random.key(seed), sim, sim * 0.5, ids)
    assert bool(jnp.all(vi)) and bool(jnp.all(vt))
    assert not np.any(np.asarray(ids[neg_t]) == np.asarray(ids))
    assert not np.any(np.asarray(ids[neg_i]) == np.asarray(ids))
    seen.update(np.asarray(neg_t).tolist())
  assert len(seen) > 4  # sampled, not argmax
  # A batch where every row shares one id has no negative: flagged invalid, not crashing.
  _, _, vi, vt = sample(jax.random.key(0), sim, sim, jnp.zeros(8, jnp.int32))
  assert not np.any(vi) and not np.any(vt)


def test_itm_loss_ignores_invalid_negatives():
  logits = jnp.array([[0.0, 2.0], [1.0, -1.0], [3.0, 0.0]])
  labels = jnp.array([1, 0, 0])
  got = objectives.itm_loss(logits, labels, jnp.array([1.0, 1.0, 0.0]))
  nll = lambda z, y: -(z[y] - np.log(np.exp(z).sum()))
  want = (nll(np.array([0.0, 2.0]), 1) + nll(np.array([1.0, -1.0]), 0)) / 2
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


# Local batches (official: each GPU's ITC keys / positives and ITM hard negatives are its
# own rows; the all-gather only fills the queue).


def test_local_itc_is_the_mean_of_each_devices_loss():
  rng = np.random.default_rng(2)
  e, q, b = 6, 5, 3
  feats = [_unit(rng.normal(size=(2 * b, e))) for _ in range(4)]
  qi, qt = _unit(rng.normal(size=(q, e))), _unit(rng.normal(size=(q, e)))
  ids = np.array([0, 1, 0, 1, 4, 5])          # id 1 on both devices: not a positive across
  qids = np.array([-100, 1, 7, 0, 5])
  per_device = [_np_itc(*[f[g * b:(g + 1) * b] for f in feats], ids[g * b:(g + 1) * b],
                        qi, qt, qids, 0.07, 0.4) for g in range(2)]
  args = [jnp.asarray(f, jnp.float32) for f in feats]
  local, (sim_i2t, _) = objectives.itc_loss(*args, ids, qi, qt, qids, 0.07, 0.4, groups=2)
  np.testing.assert_allclose(float(local), np.mean(per_device), rtol=2e-5)
  assert sim_i2t.shape == (2, b, b + q)
  whole, _ = objectives.itc_loss(*args, ids, qi, qt, qids, 0.07, 0.4, groups=1)
  assert abs(float(whole) - float(local)) > 1e-3


def test_local_hard_negatives_on_a_2_device_mesh():
  """On a 2-device mesh each device's hard negatives are drawn from its own rows, with the
  official weights softmax(local sims) over the other-id rows, and no all-gather."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  rng = np.random.default_rng(3)
  b, e, q = 4, 8, 6
  feats = [_unit(rng.normal(size=(2 * b, e))).astype(np.float32) for _ in range(4)]
  qi, qt = _unit(rng.normal(size=(q, e))), _unit(rng.normal(size=(q, e)))
  ids = np.array([0, 1, 0, 3, 4, 4, 6, 7], np.int32)  # device 0: rows 0-3, device 1: 4-7
  qids = np.full(q, -100, np.int32)

  def step(key, img, txt, img_m, txt_m, ids):
    loss, (s_i2t, s_t2i) = objectives.itc_loss(img, txt, img_m, txt_m, ids, qi, qt, qids,
                                               0.1, 0.4, groups=2)
    return loss, objectives.sample_hard_negatives(key, s_i2t, s_t2i,
                                                  objectives.grouped(ids, 2))

  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  rows = NamedSharding(mesh, P("data"))
  fn = jax.jit(step, in_shardings=(None, rows, rows, rows, rows, rows))
  args = (jax.random.key(0), *feats, ids)
  assert "all-gather" not in fn.lower(*args).compile().as_text()
  _, (neg_text, neg_image, valid_i, valid_t) = fn(*args)
  assert neg_text.shape == (2, b) and bool(jnp.all(valid_i)) and bool(jnp.all(valid_t))
  for neg in (np.asarray(neg_text), np.asarray(neg_image)):
    assert neg.min() >= 0 and neg.max() < b                 # an index into its own rows
    picked = ids.reshape(2, b)[np.arange(2)[:, None], neg]
    assert not np.any(picked == ids.reshape(2, b))          # never a positive
  # Sampling frequencies against the official weights, written out in numpy.
  sims = np.stack([feats[0][g * b:(g + 1) * b] @ feats[3][g * b:(g + 1) * b].T / 0.1
                   for g in range(2)])
  same = ids.reshape(2, b)[:, :, None] == ids.reshape(2, b)[:, None, :]
  w = np.exp(sims - sims.max(-1, keepdims=True))
  w = np.where(same, 0.0, w / w.sum(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  n = 4000
  draws = jax.vmap(lambda k: objectives.sample_hard_negatives(
      k, jnp.asarray(sims), jnp.asarray(sims), jnp.asarray(ids.reshape(2, b)))[0])(
          jax.random.split(jax.random.key(1), n))
  freq = np.stack([(np.asarray(draws) == j).mean(0) for j in range(b)], axis=-1)
  np.testing.assert_allclose(freq, w, atol=0.03)


def test_alpha_ramp_over_epoch_0():
  """Official `alpha * min(1, i / len(data_loader))` in epoch 0: by hand at 0, 5, 10, 25 of
  a 10-iteration epoch; no ramp = alpha from the first step."""
  got = [float(objectives.ramped_alpha(0.4, i, 10)) for i in (0, 5, 10, 25)]
  assert got == pytest.approx([0.0, 0.2, 0.4, 0.4])
  assert objectives.ramped_alpha(0.4, 3, 0) == 0.4
  for name in ("pretrain", "retrieval"):
    config = experiment.load(
        f"{REPO}/configs/{name}.py:size=base,synthetic=1,train_examples=64000,epochs=3")
    per_epoch = config_lib.steps_for_epochs(3, 64000, config.batch_size)[1]
    assert config.objective.alpha_ramp_steps == per_epoch * config.optimizer.accum_steps
    assert config.objective.negatives == "local" and config.objective.hard_negative_eps == 0


def test_token_mean_per_device_then_averaged():
  """Caption / MLM / LM reduction (official: PyTorch's mean on each device, averaged over
  devices): device 0 has one target (loss -log 0.5), device 1 three (-log 0.25 each)."""
  probs = np.full((4, 3, 4), 0.25, np.float32)
  probs[0, 0] = [0.5, 0.5, 0.0, 0.0]
  logits = jnp.log(jnp.asarray(probs) + 1e-30)
  labels = jnp.asarray([[-100, 0, -100], [-100, -100, -100],
                        [-100, 1, 2], [-100, 3, -100]])
  per_device = objectives.caption_loss(logits, labels, groups=2)
  np.testing.assert_allclose(float(per_device), (np.log(2) + np.log(4)) / 2, rtol=1e-5)
  whole = objectives.caption_loss(logits, labels, groups=1)
  np.testing.assert_allclose(float(whole), (np.log(2) + 3 * np.log(4)) / 4, rtol=1e-5)


def _np_giou(a, b):
  """DETR's generalized_box_iou of matching rows, corner boxes (numpy)."""
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  union = area(a) + area(b) - inter
  lt, rb = np.minimum(a[:, :2], b[:, :2]), np.maximum(a[:, 2:], b[:, 2:])
  hull = np.prod(np.clip(rb - lt, 0, None), axis=1)
  return inter / union - (hull - union) / hull


def test_grounding_loss_box_tokens_and_weights():
  """M1 `model_grounding_mplug.py`: logits + (-10000 outside the box tokens), per-token CE,
  weights |argmax box - target| clamped to [0, 5] and 1 - GIoU, and the official
  `loss.view(bs, -1, 4) * l1 * giou.unsqueeze(1)` broadcast, mean; 4 bins here (ids 3-7)."""
  first, bins, vocab = 3, 4, 10
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, vocab)).astype(np.float32)
  logits[:, :, 0] = 50.0                       # a non-box token wins the full vocabulary
  logits[0, :4, first + 2] += 10.0             # row 0 predicts bins (2, 2, 2, 2)
  labels = np.array([[-100, 5, 5, 4, 4], [-100, 3, 7, 6, 5]])
  boxes = np.array([[0.5, 0.5, 0.25, 0.25], [0.1, 0.9, 0.6, 0.3]], np.float32)
  _, l1, giou = objectives.grounding_weights(jnp.asarray(logits), jnp.asarray(boxes), first,
                                             bins)
  # By hand, row 0: predicted box (0.5, 0.5, 0.5, 0.5) = corners (.25, .25, .75, .75), the
  # target's (.375, .375, .625, .625) inside it: IoU 0.0625 / 0.25, hull = union, GIoU 0.25.
  np.testing.assert_allclose(np.asarray(l1)[0], [0, 0, 0.25, 0.25], atol=1e-6)
  np.testing.assert_allclose(float(giou[0]), 0.75, rtol=1e-6)
  # The numpy reference of the official expression.
  masked = logits + np.where((np.arange(vocab) >= first) & (np.arange(vocab) <= first + bins),
                             0.0, -10000.0)
  shifted = masked[:, :-1]
  lse = np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1)) + shifted.max(-1)
  ce = lse - np.take_along_axis(shifted, labels[:, 1:, None], -1)[..., 0]       # (2, 4)
  pred = (shifted.argmax(-1) - first) / bins
  w_l1 = np.clip(np.abs(pred - boxes), 0, 5)
  corners = lambda x: np.concatenate([x[:, :2] - x[:, 2:] / 2, x[:, :2] + x[:, 2:] / 2], 1)
  w_giou = 1 - _np_giou(corners(pred), corners(boxes))
  official = (ce.reshape(2, -1, 4) * w_l1 * w_giou[:, None]).mean()            # (2, 2, 4)
  got = objectives.grounding_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(boxes),
                                  "official", 1, first, bins)
  np.testing.assert_allclose(float(got), official, rtol=1e-5)
  per_box = objectives.grounding_loss(jnp.asarray(logits), jnp.asarray(labels),
                                      jnp.asarray(boxes), "per_box", 1, first, bins)
  np.testing.assert_allclose(float(per_box), (ce * w_l1 * w_giou[:, None]).mean(), rtol=1e-5)
  plain = objectives.grounding_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(boxes), "unweighted", 1, first, bins)
  np.testing.assert_allclose(float(plain), ce.mean(), rtol=1e-5)


def test_mlm_soft_label_distillation():
  """(1 - alpha) CE + alpha mean over the masked tokens of -sum softmax(momentum logits)
  log_softmax(logits) (ALBEF's soft labels, over the vocabulary)."""
  rng = np.random.default_rng(5)
  logits, soft = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
  labels = np.array([[-100, 2, 5], [1, -100, -100]])
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  valid = labels != -100
  ce = -np.take_along_axis(log_softmax(logits), np.where(valid, labels, 0)[..., None], -1)[..., 0]
  distill = -(np.exp(log_softmax(soft)) * log_softmax(logits)).sum(-1)
  want = 0.6 * ce[valid].mean() + 0.4 * distill[valid].mean()
  got = objectives.mlm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 1,
                            jnp.asarray(soft, jnp.float32), 0.4)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  plain = objectives.mlm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(plain), ce[valid].mean(), rtol=1e-5)


def test_mlm_masking_proportions():
  rng = np.random.default_rng(0)
  n, length, vocab = 400, 50, 30522
  ids = rng.integers(1000, vocab, (n, length)).astype(np.int32)
  ids[:, 0] = 101
  mask = np.ones_like(ids)
  mask[:, 40:] = 0
  ids[:, 40:] = 0
  out, labels = jax.jit(objectives.mask_tokens, static_argnums=3)(
      jax.random.key(0), ids, mask, vocab)
  out, labels = np.asarray(out), np.asarray(labels)
  selected = labels != -100
  assert not selected[:, 0].any() and not selected[:, 40:].any()  # never [CLS] or padding
  np.testing.assert_array_equal(labels[selected], ids[selected])
  np.testing.assert_array_equal(out[~selected], ids[~selected])
  frac = selected.sum() / (n * 39)
  assert abs(frac - 0.15) < 0.01, frac
  masked = (out == 103) & selected
  kept = (out == ids) & selected
  random = selected & ~masked & ~kept
  total = selected.sum()
  assert abs(masked.sum() / total - 0.8) < 0.02
  assert abs(kept.sum() / total - 0.1) < 0.02
  assert abs(random.sum() / total - 0.1) < 0.02


def test_token_and_classification_losses_hand_checked():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  labels = jnp.array([[2, -100]])
  np.testing.assert_allclose(float(losses.token_mean_loss(logits, labels)), -np.log(0.25),
                             rtol=1e-6)
  cls = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
  np.testing.assert_allclose(float(objectives.classification_loss(cls, jnp.array([0, 1]))),
                             -(np.log(0.5) + np.log(0.1)) / 2, rtol=1e-6)
  smooth = objectives.classification_loss(cls, jnp.array([0, 1]), smoothing=0.2)
  want = -np.mean([0.9 * np.log(0.5) + 0.1 * np.log(0.5), 0.1 * np.log(0.9) + 0.9 * np.log(0.1)])
  np.testing.assert_allclose(float(smooth), want, rtol=1e-6)


def test_queue_enqueue_wraps():
  q = objectives.init_queues(jax.random.key(0), 4, 3)
  np.testing.assert_allclose(np.linalg.norm(q["image"], axis=1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(q["ids"]) == -100)
  for i in range(3):
    feats = jnp.full((2, 3), float(i))
    q = objectives.enqueue(q, feats, feats, jnp.array([10 * i, 10 * i + 1]))
  np.testing.assert_array_equal(q["ids"], [20, 21, 10, 11])
  assert int(q["ptr"]) == 2


def test_no_queue_is_no_state_and_in_batch_itc(tmp_path):
  """queue_size 0: nothing zero-sized in the state (checkpoints cannot hold it), enqueue is
  a no-op, and the ITC keys are the batch's momentum features only."""
  assert objectives.init_queues(jax.random.key(0), 0, 8) == {}
  assert objectives.enqueue({}, jnp.ones((2, 8)), jnp.ones((2, 8)), jnp.arange(2)) == {}
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  img, txt = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(4, 8)))
  empty = jnp.zeros((0, 8))
  loss, _ = objectives.itc_loss(img, txt, img, txt, jnp.arange(4), empty, empty,
                                jnp.zeros((0,), jnp.int32), 0.1, 0.0)
  logits = img @ txt.T / 0.1
  log_softmax = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))
  want = -(np.trace(log_softmax(logits)) + np.trace(log_softmax(logits.T))) / 8
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)

  config = tiny_config("retrieval")
  config.objective.queue_size = 0
  setup = state_lib.TrainSetup(config, sharding.make_mesh(config, jax.devices()[:1]),
                              dummy_batch(config.model, B, L))
  state = setup.init()
  assert "queues" not in state.extra
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  assert ckpt.save(1, state, FakeIterator(config), force=True)
  ckpt.close()
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  restored, step = ckpt.restore(setup.abstract_sharded_state(), FakeIterator(config))
  ckpt.close()
  assert step == 1 and "queues" not in restored.extra
  assert_trees_equal(state.params, restored.params)


def test_split_micro_batches_keeps_answers_with_their_question():
  batch = {"video": np.arange(4)[:, None] * np.ones((4, 3)),
           "answer_ids": np.repeat(np.arange(4), 2)[:, None] * np.ones((8, 2)),
           "answer_question_index": np.repeat(np.arange(4), 2)}
  out = step_lib.split_micro_batches(batch, 2)
  for i in range(2):
    questions = out["video"][i][:, 0]
    np.testing.assert_array_equal(questions, [i, i + 2])
    rows = out["answer_ids"][i][:, 0]
    np.testing.assert_array_equal(questions[out["answer_question_index"][i]], rows)


# --------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_abstract_params():
  config = tiny_config("pretrain")
  return sharding.unboxed(sharding.abstract_params(
      mplug2.build(config.model), dummy_batch(config.model, 2, L)))


def test_param_groups_follow_the_official_rule(pretrain_abstract_params):
  o = optimizer.default_optimizer_config()
  groups = optimizer.param_groups(pretrain_abstract_params, o)
  expect = {
      "vision/blocks/attn/query/kernel": "lr0.1_wd0.02",
      "vision/blocks/attn/query/bias": "lr0.1_wd0",
      "vision/blocks/temporal1/conv_bias": "lr0.1_wd0",
      "vision/ln_pre/scale": "lr0.1_wd0.02",          # CLIP LayerNorm gains are decayed
      "vision/class_embedding": "lr0.1_wd0.02",
      "visn_emb_norm/scale": "lr1_wd0.02",            # not a BERT "LayerNorm.weight"
      "text_encoder/text_layers/mlp_norm/scale": "lr1_wd0",
      "text_encoder/embeddings/norm/scale": "lr1_wd0",
      "fusion/layers_0/layer/cross_attn_norm/scale": "lr1_wd0",
      "decoder/head/norm/scale": "lr1_wd0",
      "mlm_head/norm/scale": "lr1_wd0",
      "text_encoder/latent_queries": "lr1_wd0.02",
      "itc_head/temp": "lr1_wd0.02",
      "decoder/layers/mlp/wi/kernel": "lr1_wd0.02",
  }
  for name, label in expect.items():
    assert groups[name] == label, name
  o.decay_clip_norms = False
  groups = optimizer.param_groups(pretrain_abstract_params, o)
  assert groups["vision/ln_pre/scale"] == "lr0.1_wd0"
  assert groups["visn_emb_norm/scale"] == "lr1_wd0"
  o.frozen = ("^vision/",)
  groups = optimizer.param_groups(pretrain_abstract_params, o)
  assert all(v == "frozen" for k, v in groups.items() if k.startswith("vision/"))
  assert groups["decoder/layers/mlp/wi/kernel"] == "lr1_wd0.02"


def test_optimizer_lr_mult_decay_and_frozen():
  o = optimizer.default_optimizer_config()
  o.update(schedule="constant", lr=0.01, weight_decay=0.5, frozen=("^frozen/",))
  params = {"vision": {"w": {"kernel": jnp.ones(3)}, "b": {"bias": jnp.ones(3)}},
            "text": {"w": {"kernel": jnp.ones(3)}},
            "frozen": {"kernel": jnp.ones(3)}}
  tx, lr_fn = optimizer.make(o, params, total_steps=10)
  state = tx.init(params)
  # Zero gradients: only decoupled weight decay moves the decayed weights (-lr*wd*p).
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, state, params)
  np.testing.assert_allclose(upd["text"]["w"]["kernel"], -0.01 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(upd["vision"]["w"]["kernel"], -0.001 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(upd["vision"]["b"]["bias"], 0.0)
  # Unit gradients: Adam's first step is -lr per weight; vision runs at 0.1 x lr.
  o.weight_decay = 0.0
  tx, _ = optimizer.make(o, params, total_steps=10)
  upd, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(upd["text"]["w"]["kernel"], -0.01, rtol=1e-4)
  np.testing.assert_allclose(upd["vision"]["w"]["kernel"], -0.001, rtol=1e-4)
  np.testing.assert_array_equal(upd["frozen"]["kernel"], 0.0)
  assert float(lr_fn(5)) == pytest.approx(0.01)


# A reference of the official schedules written from the official code (not from ours):
# timm's CosineLRScheduler._get_lr as the official copy has it (warmup_prefix True,
# cycle_limit 1), and the official training loops that step it.


def _timm_lr(t, base, warmup_t, warmup_lr, min_lr, t_initial, prefix=True):
  if t < warmup_t:
    return warmup_lr + t * (base - warmup_lr) / warmup_t
  if prefix:
    t = t - warmup_t
  cycle = t // t_initial
  if cycle >= 1:
    return min_lr
  return min_lr + 0.5 * (base - min_lr) * (1 + np.cos(np.pi * (t - t_initial * cycle) / t_initial))


def _official_finetune_lrs(iters, epochs, accum, step_size, warmup, base, warmup_lr, min_lr):
  """lr of each optimizer step of M2 `video_{qa,caption}_mplug2.py`: the scheduler starts at
  warmup_lr, the optimizer steps at every accum-th iteration, then the scheduler is stepped
  with i // step_size (epoch 0, i % step_size == 0, i <= warmup * step_size) or the global
  iteration; t_initial = epochs * iters - warmup."""
  sched = lambda t: _timm_lr(t, base, warmup, warmup_lr, min_lr, epochs * iters - warmup)
  lr, used = warmup_lr, []
  for epoch in range(epochs):
    for i in range(iters):
      if (i + 1) % accum == 0:
        used.append(lr)
      if epoch == 0 and i % step_size == 0 and i <= warmup * step_size:
        lr = sched(i // step_size)
      else:
        lr = sched(epoch * iters + i)
  return np.array(used)


def _official_pretrain_lrs(iters, epochs, step_size, warmup, base, warmup_lr, min_lr):
  """lr of each iteration of the M1 / ALBEF loop with `sched: cosine` (t in epochs): the
  scheduler is stepped with epoch + warmup before epochs >= 1, and after iterations of
  epoch 0 with i // step_size (i % step_size == 0, i <= warmup * step_size)."""
  sched = lambda t: _timm_lr(t, base, warmup, warmup_lr, min_lr, epochs)
  lr, used = warmup_lr, []
  for epoch in range(epochs):
    if epoch > 0:
      lr = sched(epoch + warmup)
    for i in range(iters):
      used.append(lr)
      if epoch == 0 and i % step_size == 0 and i <= warmup * step_size:
        lr = sched(i // step_size)
  return np.array(used)


def test_cosine_step_schedule_hand_values():
  """The timm formula at chosen steps, by hand: warmup_prefix True (official) vs False."""
  o = optimizer.default_optimizer_config()
  o.update(lr=1e-3, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-6, lr_lag=False)
  f = optimizer.cosine_step(1e-3, o, total_steps=110)  # T = 100
  assert float(f(0)) == pytest.approx(1e-5)
  assert float(f(5)) == pytest.approx(1e-5 + 5 * (1e-3 - 1e-5) / 10)
  # Official: the cosine runs over t - 10: base at the end of the warm-up, halfway at 60,
  # min_lr only at t = 110.
  assert float(f(10)) == pytest.approx(1e-3)
  assert float(f(60)) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
  assert float(f(109)) > 1e-6 and float(f(110)) == pytest.approx(1e-6)
  o.warmup_prefix = False  # the cosine clock over t: min_lr from t = 100 on
  g = optimizer.cosine_step(1e-3, o, total_steps=110)
  assert float(g(50)) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
  assert float(g(100)) == pytest.approx(1e-6) and float(g(105)) == pytest.approx(1e-6)
  # Scheduler lag (VideoQA): step k runs at sched(k - 1), step 0 at warmup_lr.
  o.update(warmup_prefix=True, lr_lag=True)
  h = optimizer.cosine_step(1e-3, o, total_steps=110)
  assert [float(h(k)) for k in (0, 1, 11)] == pytest.approx([1e-5, 1e-5, 1e-3])


@pytest.mark.parametrize("name,accum,dips", [("videoqa", 1, 0), ("caption", 2, 3)])
def test_cosine_step_matches_the_official_loop(name, accum, dips):
  """Every optimizer step of a small run against the official loop: VideoQA (lag), caption
  (2 micro-batches per step, lr dips after every 3rd iteration of epoch 0)."""
  iters, epochs, warmup = 20, 3, 4                   # warmup in iterations
  want = _official_finetune_lrs(iters, epochs, accum, dips or 1, warmup, 2e-5, 1e-6, 1e-6)
  o = optimizer.default_optimizer_config()
  o.update(lr=2e-5, warmup_steps=warmup // accum, accum_steps=accum, epoch0_dips=dips,
           steps_per_epoch=iters // accum)
  f = optimizer.cosine_step(2e-5, o, total_steps=epochs * iters // accum)
  got = np.array([float(f(k)) for k in range(len(want))])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if dips:  # by hand: step 3 ends iteration 7, whose lr was set after iteration 6 (a
    # multiple of 3): sched(6 // 3 = 2), half the warm-up, after step 2 ran at base.
    assert got[3] == pytest.approx(1e-6 + 2 * (2e-5 - 1e-6) / 4)
    assert got[2] == pytest.approx(2e-5) and got[4] > got[3]


def test_cosine_epoch_matches_the_official_pretraining_loop():
  """The pretraining `sched: cosine`: 3 warm-up stairs of 2 iterations, then a cosine per
  epoch over 4 epochs, against the official loop at every iteration."""
  iters, epochs, stair, warmup = 10, 4, 2, 3
  want = _official_pretrain_lrs(iters, epochs, stair, warmup, 5e-5, 1e-6, 2e-6)
  o = optimizer.default_optimizer_config()
  o.update(schedule="cosine_epoch", lr=5e-5, warmup_steps=warmup, warmup_stair=stair,
           epochs=epochs, steps_per_epoch=iters, min_lr=2e-6)
  f = optimizer.make_schedule(5e-5, o, epochs * iters)
  got = np.array([float(f(k)) for k in range(len(want))])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # By hand: iterations 3-4 on stair 1; the rest of epoch 0 at base; epoch 2 at
  # cos(pi 2 / 4), i.e. halfway.
  assert got[3] == got[4] == pytest.approx(1e-6 + (5e-5 - 1e-6) / 3)
  assert got[9] == pytest.approx(5e-5)
  assert got[25] == pytest.approx(2e-6 + 0.5 * (5e-5 - 2e-6))


def test_global_norm_clipping():
  o = optimizer.default_optimizer_config()
  o.update(schedule="constant", lr=1.0, weight_decay=0.0, grad_clip_norm=1.0, lr_mults=(),
           b1=0.0, b2=0.0, eps=0.0)
  params = {"a": {"kernel": jnp.zeros(4)}}
  tx, _ = optimizer.make(o, params, 1)
  # b1=b2=0 Adam is sign-like; check the clipped gradient through the chain's first stage.
  clipped, _ = tx.update({"a": {"kernel": jnp.full(4, 10.0)}}, tx.init(params), params)
  assert np.all(np.isfinite(clipped["a"]["kernel"]))
  import optax
  g, _ = optax.clip_by_global_norm(1.0).update({"x": jnp.full(4, 10.0)}, None)
  np.testing.assert_allclose(optax.tree.norm(g), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------
# The compiled step (one compile for the module).
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retrieval():
  config = tiny_config("retrieval")
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  setup = state_lib.TrainSetup(config, mesh, dummy_batch(config.model, B, L))
  return config, setup, step_lib.JittedStep(setup)


def run_steps(config, fn, state, iterator, n):
  out = []
  for _ in range(n):
    state, metrics = fn(state, next(iterator))
    out.append(host(metrics))
  return state, out


def test_step_trains_and_updates_momentum_and_queue(retrieval):
  config, setup, fn = retrieval
  state = setup.init()
  before = host(state)
  it = FakeIterator(config)
  state, metrics = run_steps(config, fn, state, it, 2)
  after = host(state)
  for m in metrics:
    assert m["finite"] and np.isfinite(m["loss"]) and {"loss/itc", "loss/itm"} <= set(m)
  assert int(after["step"] if isinstance(after, dict) else after.step) == 2
  assert int(after.extra["queues"]["ptr"]) == (2 * B) % config.objective.queue_size
  np.testing.assert_array_equal(after.extra["queues"]["ids"][:B], synthetic_batch(config, 1001)["image_ids"])
  # EMA moved towards the params, by (1 - m) per step.
  k = ("vision", "ln_post", "scale")
  p0, e1 = before.params, after.extra["ema"]
  get = lambda t: t[k[0]][k[1]][k[2]]
  assert not np.array_equal(get(e1), get(p0))
  assert not np.array_equal(get(after.params), get(p0))
  # lr follows the warm-up from warmup_lr.
  assert metrics[0]["lr"] == pytest.approx(1e-4)


def test_exact_resume_bit_for_bit(retrieval, tmp_path):
  config, setup, fn = retrieval
  n, k = 3, 1
  _, straight = run_steps(config, fn, setup.init(), FakeIterator(config), n)

  it = FakeIterator(config)
  state, first = run_steps(config, fn, setup.init(), it, k)
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  assert ckpt.save(k, state, it, force=True)
  ckpt.close()
  del state

  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  it2 = FakeIterator(config)
  restored, step = ckpt.restore(setup.abstract_sharded_state(), it2)
  assert step == k and it2.position == k
  _, rest = run_steps(config, fn, restored, it2, n - k)
  ckpt.close()
  resumed = first + rest
  for a, b in zip(straight, resumed):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_nan_guard_skips_and_stops(retrieval):
  config, setup, fn = retrieval
  state = setup.init()
  before = host(state)
  bad = synthetic_batch(config, 7)
  bad["video"][0] = np.nan
  state, m = fn(state, bad)
  m = host(m)
  assert not m["finite"] and m["nonfinite"] == 1 and m["nonfinite_total"] == 1
  after = host(state)
  assert int(after.step) == 0
  assert_trees_equal((before.params, before.opt_state, before.extra),
                     (after.params, after.opt_state, after.extra))
  step_lib.check_nonfinite(m, max_consecutive=2, batch_step=1)  # one is tolerated
  state, m = fn(state, bad)
  with pytest.raises(step_lib.NonFiniteError,
                     match=r"2 consecutive.*the last at step 2, optimizer step 0.*loss"):
    step_lib.check_nonfinite(host(m), max_consecutive=2, batch_step=2)
  state, m = fn(state, synthetic_batch(config, 8))
  m = host(m)
  assert m["finite"] and m["nonfinite"] == 0 and m["nonfinite_total"] == 2
  assert int(host(state).step) == 1


# --------------------------------------------------------------------------------------
# Checkpoints: another mesh, SIGTERM, retention.
# --------------------------------------------------------------------------------------


def test_restore_onto_a_different_mesh(tmp_path):
  assert jax.device_count() == 8, "conftest must set 8 fake CPU devices"
  config = tiny_config("classification", mesh=(8, 1, 1))
  batch = dummy_batch(config.model, B, L)
  setup = state_lib.TrainSetup(config, sharding.make_mesh(config), batch)
  state = setup.init(seed=3)
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  ckpt.save(0, state, force=True)
  ckpt.close()

  config2 = tiny_config("classification", mesh=(2, 2, 2))
  setup2 = state_lib.TrainSetup(config2, sharding.make_mesh(config2), batch)
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  restored, _ = ckpt.restore(setup2.abstract_sharded_state())
  ckpt.close()
  assert_trees_equal(state, restored)
  want = jax.tree.leaves(setup2.state_shardings)
  got = [x.sharding for x in jax.tree.leaves(restored)]
  assert all(g.is_equivalent_to(w, x.ndim) for g, w, x in zip(got, want, jax.tree.leaves(restored)))
  # Something is actually split on the new mesh (fsdp x tensor).
  assert any(not s.is_fully_replicated for s in got)


def test_sigterm_requests_a_save(tmp_path):
  tree = {"w": jnp.arange(4.0)}
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"))
  with checkpointing.PreemptionGuard() as guard:
    for step in range(1, 100):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      if guard.should_stop(step):
        ckpt.save(step, tree, force=True)
        break
  ckpt.close()
  assert step == 3 and ckpt.all_steps() == [3]
  assert signal.getsignal(signal.SIGTERM) is not guard._handler


def test_only_the_guard_moves_the_preemption_sync_counter(tmp_path, monkeypatch):
  """JAX's sync point remembers the step of its latest call and publishes it when a notice
  comes; orbax's manager would call it from its finalize thread with the step of a finished
  asynchronous save (older than the loop's), so a process could publish a stale step and
  miss the agreed stop step. Only the guard's per-step calls may reach it."""
  from jax.experimental import multihost_utils

  calls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or False)
  c = checkpointing.default_checkpoint_config()
  c.update(every_steps=2, async_save=True)
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"), c)
  guard = checkpointing.PreemptionGuard()
  guard.synchronised = True  # as with jax.distributed up (no signal handler here)
  tree = {"w": jnp.arange(4.0)}
  for step in range(1, 6):
    ckpt.save(step, tree, force=step == 5)  # interval saves, then a forced one
    ckpt.wait()  # the finalize thread has run
    assert not guard.should_stop(step, ckpt)
  ckpt.close()
  assert ckpt.all_steps() == [2, 4, 5]
  assert calls == [1, 2, 3, 4, 5]


def test_keep_last_k_plus_best(tmp_path):
  c = checkpointing.default_checkpoint_config()
  c.update(every_steps=1, keep=2, keep_best=1, best_metric="score", best_mode="max")
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"), c)
  scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.5}
  for step, score in scores.items():
    ckpt.save(step, {"w": jnp.full(2, float(step))}, metrics={"score": score})
    ckpt.wait()
  ckpt.close()
  assert sorted(ckpt.all_steps()) == [2, 5, 6]
  # An unfinished (killed) save is a temporary directory, never a step.
  (tmp_path / "ckpt" / "7.orbax-checkpoint-tmp-123").mkdir()
  fresh = checkpointing.Checkpoints(str(tmp_path / "ckpt"), c)
  assert fresh.latest_step() == 6
  fresh.close()


# --------------------------------------------------------------------------------------
# Every task's objective through the model (forward only; slow: one compile per task).
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", ["caption", "videoqa", "classification", "pretrain"])
def test_task_objectives_through_the_model(task):
  config = tiny_config(task)
  config.model.text.dropout = config.model.text.attention_dropout = 0.0
  batch = synthetic_batch(config, 0)
  model = mplug2.build(config.model, deterministic=False)
  params = jax.jit(mplug2.build(config.model).init)(jax.random.key(0), dummy_batch(
      config.model, B, L))["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  extra = objectives.init_extra(jax.random.key(1), params, config.model, config.objective)
  total, (metrics, _) = jax.jit(lambda p, b: objectives.loss(
      model, p, extra, b, jax.random.key(2), config.objective))(params, batch)
  assert np.isfinite(float(total))
  if task == "caption":
    out, _ = model.apply({"params": params}, batch)
    np.testing.assert_allclose(metrics["loss/caption"],
                               objectives.caption_loss(out["logits"], batch["caption_labels"]),
                               rtol=1e-5)
  if task == "pretrain":
    assert {"loss/itc", "loss/itm", "loss/mlm", "loss/lm"} <= set(metrics)
    parts = sum(float(metrics[f"loss/{k}"]) for k in ("itc", "itm", "mlm", "lm"))
    np.testing.assert_allclose(float(total), parts, rtol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch():
  """Classification (no dropout, mean over examples): 2 micro-batches of 4 = one of 8."""
  batch = synthetic_batch(tiny_config("classification"), 0)
  params = []
  for accum in (1, 2):
    config = tiny_config("classification", accum_steps=accum)
    setup = state_lib.TrainSetup(config, sharding.make_mesh(config, jax.devices()[:1]),
                                dummy_batch(config.model, B, L))
    state, metrics = step_lib.JittedStep(setup)(setup.init(), batch)
    params.append(host(state.params))
    assert metrics["finite"]
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
