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

from mplug2_jax import experiment, sharding
from mplug2_jax.layers import losses
from mplug2_jax.models import mplug2
from mplug2_jax.models.mplug2 import objectives
from mplug2_jax.train import checkpointing, optimizer, state as state_lib, step as step_lib
from conftest import dummy_batch

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


def test_cosine_step_schedule_official_values():
  o = optimizer.default_optimizer_config()
  o.update(lr=1e-3, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-6)
  f = optimizer.cosine_step(1e-3, o, total_steps=110)  # t_initial = 100
  assert float(f(0)) == pytest.approx(1e-5)
  assert float(f(5)) == pytest.approx(1e-5 + 5 * (1e-3 - 1e-5) / 10)
  # Official (warmup_prefix False): the cosine clock starts at t = 0, not at the warm-up end.
  t = 50
  assert float(f(t)) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * t / 100)))
  assert float(f(100)) == pytest.approx(1e-6) and float(f(105)) == pytest.approx(1e-6)
  o.warmup_prefix = True
  g = optimizer.cosine_step(1e-3, o, total_steps=110)
  assert float(g(10)) == pytest.approx(1e-3)
  assert float(g(110)) == pytest.approx(1e-6)


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
