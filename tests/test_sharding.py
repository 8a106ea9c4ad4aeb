"""Logical-axis sharding on 8 fake CPU devices: parameter layouts and sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mplug2_jax import experiment, sharding
from conftest import dummy_batch
from mplug2_jax.models import mplug2

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
BATCH = 8


def tiny(shape):
  config = experiment.base_config("tiny", "videoqa")
  config.model.num_frames = 2
  config.mesh.shape = shape
  config.batch_size = BATCH
  return config


def random_batch(config):
  batch = dummy_batch(config.model, BATCH, 6)
  rng = np.random.default_rng(0)
  batch["video"] = jnp.asarray(rng.normal(size=batch["video"].shape), jnp.float32)
  for name in ("text_ids", "answer_ids"):
    batch[name] = jnp.asarray(rng.integers(104, 512, batch[name].shape), jnp.int32)
  batch["text_mask"] = batch["text_mask"].at[::2, 4:].set(0)
  return batch


def forward(config, mesh, params, batch):
  model = mplug2.build(config.model)
  batch = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
  with sharding.activate(mesh, config):
    out, _ = jax.jit(model.apply)({"params": params}, batch)
  return np.asarray(out["logits"])


@pytest.fixture(scope="module")
def reference():
  """Single-device forward and the (unsharded) parameters it used."""
  assert jax.device_count() == 8, "conftest must set 8 fake CPU devices"
  config = tiny((1, 1, 1))
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  batch = random_batch(config)
  params, _ = sharding.init_params(mplug2.build(config.model), batch, jax.random.key(0), mesh,
                                   config)
  return jax.device_get(params), batch, forward(config, mesh, params, batch)


def leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_params_follow_rules_and_sharded_forward_matches(reference, shape):
  ref_params, batch, ref_logits = reference
  config = tiny(shape)
  mesh = sharding.make_mesh(config)
  model = mplug2.build(config.model)
  params, shardings = sharding.init_params(model, batch, jax.random.key(0), mesh, config)

  expected_specs = {
      # (vocab, embed) -> (tensor, fsdp)
      "decoder/embeddings/word/embedding": P("tensor", "fsdp"),
      # (layers, embed, mlp) -> (-, fsdp, tensor)
      "vision/blocks/mlp/wi/kernel": P(None, "fsdp", "tensor"),
      # (layers, embed, heads, kv): 4 text heads shard over tensor
      "text_encoder/text_layers/self_attn/query/kernel": P(None, "fsdp", "tensor", None),
      # (heads, kv, embed)
      "text_encoder/universal_0/self_attn/out/kernel": P("tensor", None, "fsdp"),
      "visn_emb_norm/scale": P(None),
  }
  for path, spec in expected_specs.items():
    assert leaf(params, path).sharding.spec == spec, path
    assert leaf(shardings, path).spec == spec
  # The tiny ViT has one head (width 64 / head dim 64): a tensor axis of 2 cannot split it,
  # so that dim is replicated instead (and reported).
  vision_q = leaf(params, "vision/blocks/attn/query/kernel").sharding.spec
  assert vision_q == P(None, "fsdp", "tensor" if mesh.shape["tensor"] == 1 else None, None)
  # Same init rng -> same values as the unsharded init, whatever the layout.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a), b)

  np.testing.assert_allclose(forward(config, mesh, params, batch), ref_logits, atol=2e-5)


def test_undividable_dims_are_reported(reference):
  config = tiny((1, 4, 2))
  mesh = sharding.make_mesh(config)
  ref_params, batch, _ = reference
  abstract = sharding.abstract_params(mplug2.build(config.model), batch)
  report = []
  sharding.logical_shardings(abstract, mesh, config, report)
  paths = [path for path, _, _ in report]
  assert any("vision" in p and "attn" in p for p in paths)
  # ITM-free videoqa: every text tower weight divides evenly.
  assert not any("text_encoder" in p and "kernel" in p for p in paths)


# Parameters allowed to stay unsharded over fsdp: vectors (biases, norm gains, the
# temporal adapters' depthwise taps) and scalars. Everything else must split.
SMALL_UNSHARDED = (r"/bias$", r"/scale$", r"/conv_kernel$", r"/conv_bias$", r"^itc_head/temp$")


@pytest.mark.parametrize("family,size,task", [
    ("mplug2", "large", "caption"), ("mplug2", "large", "videoqa"),
    ("mplug2", "large", "retrieval"), ("mplug2", "large", "pretrain"),
    ("owl2", "7b", "instruct")])
def test_large_parameters_are_sharded_over_fsdp(family, size, task):
  """On a (1, 8, 1) mesh every parameter of the large model (mPLUG-Owl2: the 7B) is split
  over the fsdp axis except the allow-listed small ones, which hold under 1% of the
  parameters (MaxText's sharding-sufficiency check). Abstract only: nothing is allocated."""
  import re

  from mplug2_jax.models import registry

  config = experiment.base_config(size, task, family=family)
  config.mesh.shape = (1, 8, 1)
  mesh = sharding.make_mesh(config)
  models = registry.get(family)
  model = models.build(config.model)
  shardings = sharding.flat(
      sharding.param_shardings(model, models.init_batch(config.model), mesh, config),
      is_leaf=lambda x: isinstance(x, NamedSharding))
  with sharding.activate(mesh, config):
    shapes = sharding.flat(sharding.unboxed(sharding.abstract_params(
        model, models.init_batch(config.model))))
  unsharded = {p for p, s in shardings.items()
               if not any("fsdp" in (e if isinstance(e, tuple) else (e,)) for e in s.spec)}
  not_allowed = sorted(p for p in unsharded if not any(re.search(r, p) for r in SMALL_UNSHARDED))
  assert not not_allowed, not_allowed
  count = lambda paths: sum(int(np.prod(shapes[p].shape)) for p in paths)
  assert count(unsharded) < 0.01 * count(shapes), (count(unsharded), count(shapes))
