"""The shared layers: attention implementations and the hooks the model families need
(rotary embeddings, grouped-query heads, per-modality key/value projections, the key/value
cache), each against a reference written out here."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax.layers import attention_op, attentions, embeddings, mlp, multiway, norms, stack


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_explicit_attention_matches_jax_nn(dtype):
  """The explicit (B, N, T, H) formulation (the CPU default) computes what
  `jax.nn.dot_product_attention` does, with a padding mask, forward and gradients."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, s, 4, 16)), dtype) for s in (5, 7, 7))
  mask = jnp.asarray(np.arange(7) < np.array([[7], [4]]))[:, None, None, :]  # (B,1,1,S)

  def loss(impl, q, k, v):
    out = attention_op.attention_op(q, k, v, mask, implementation=impl)
    return (out.astype(jnp.float32) ** 2).sum(), out

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  (l1, o1), g1 = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1, 2), has_aux=True)(q, k, v)
  (l2, o2), g2 = jax.value_and_grad(functools.partial(loss, "explicit"), (0, 1, 2), has_aux=True)(q, k, v)
  assert o2.dtype == dtype
  np.testing.assert_allclose(np.float32(o2), np.float32(o1), atol=tol, rtol=tol)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol * 4, rtol=tol * 4)
  # Rows whose keys are masked get no weight: changing them changes nothing.
  v_changed = v.at[1, 4:].set(100.0)
  np.testing.assert_array_equal(
      attention_op.attention_op(q, k, v_changed, mask, implementation="explicit")[1],
      attention_op.attention_op(q, k, v, mask, implementation="explicit")[1])


def test_auto_attention_resolves_per_backend():
  assert jax.default_backend() == "cpu"
  assert attention_op.resolve_attention("auto", jnp.float32) == "explicit"
  assert attention_op.resolve_attention("cudnn", jnp.float32) == "cudnn"
  with pytest.raises(ValueError, match="flash"):
    attention_op.resolve_attention("flash", jnp.float32)


@pytest.mark.parametrize("mask_kind", ["none", "keys", "causal"])
def test_chunked_attention_matches_explicit(monkeypatch, mask_kind):
  """Query blocks (here 4 queries, 11 = 2 full blocks + a padded one) give the explicit
  result and gradients, for no mask, a key-padding mask and a per-query (causal) mask."""
  monkeypatch.setattr(attention_op, "ATTENTION_CHUNK", 4)
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 11, 3, 8)), jnp.float32) for _ in range(3))
  mask = {"none": None,
          "keys": jnp.asarray(np.arange(11) < np.array([[11], [6]]))[:, None, None, :],
          "causal": jnp.tril(jnp.ones((11, 11), bool))[None, None]}[mask_kind]

  def loss(impl, q, k, v):
    out = attention_op.attention_op(q, k, v, mask, implementation=impl)
    return (out * jnp.arange(out.size).reshape(out.shape) / out.size).sum(), out

  (l1, o1), g1 = jax.value_and_grad(functools.partial(loss, "explicit"), (0, 1, 2), has_aux=True)(q, k, v)
  (l2, o2), g2 = jax.value_and_grad(functools.partial(loss, "chunked"), (0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(o2, o1, atol=1e-5, rtol=1e-5)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # With dropout every block draws its own mask: still the right shape and finite.
  out = attention_op.attention_op(q, k, v, mask, implementation="chunked", dropout_rate=0.5,
                            dropout_rng=jax.random.key(1))
  assert out.shape == q.shape and bool(jnp.isfinite(out).all())


# ---- rotary embeddings, sin-cos tables ----------------------------------------------------


def test_rope_against_a_hand_computed_rotation():
  """Split halves: dims i and i + H/2 rotate together by position * theta^(-2i/H)."""
  rng = np.random.default_rng(0)
  head = 8
  x = rng.normal(size=(1, 3, 2, head)).astype(np.float32)
  positions = np.array([[0, 1, 5]])
  got = np.asarray(embeddings.apply_rope(jnp.asarray(x), jnp.asarray(positions), 100.0))
  want = np.empty_like(x)
  for t, p in enumerate(positions[0]):
    for i in range(head // 2):
      angle = p * 100.0 ** (-2 * i / head)
      a, b = x[0, t, :, i], x[0, t, :, i + head // 2]
      want[0, t, :, i] = a * np.cos(angle) - b * np.sin(angle)
      want[0, t, :, i + head // 2] = b * np.cos(angle) + a * np.sin(angle)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(got[0, 0], x[0, 0])  # position 0 is the identity
  # Relative: <rope(q, m), rope(k, n)> depends on m - n only.
  q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])
  dot = lambda m, n: float(jnp.sum(embeddings.apply_rope(q, jnp.array([[m]]), 100.0)
                                   * embeddings.apply_rope(k, jnp.array([[n]]), 100.0)))
  assert dot(7, 3) == pytest.approx(dot(4, 0), abs=1e-4)


def test_sincos_tables_by_hand():
  table = embeddings.sincos_1d(np.arange(3), 4)  # omega = [1, 1/100]
  want = np.array([[np.sin(p), np.sin(p / 100), np.cos(p), np.cos(p / 100)] for p in range(3)])
  np.testing.assert_allclose(table, want, atol=1e-6)
  grid = embeddings.sincos_2d(2, 8, cls_token=True)
  assert grid.shape == (5, 8)
  np.testing.assert_array_equal(grid[0], 0)
  # Row-major patches: patch (row 0, col 1) is row 2; first half encodes the column.
  np.testing.assert_allclose(grid[2, :4], embeddings.sincos_1d([1], 4)[0], atol=1e-7)
  np.testing.assert_allclose(grid[2, 4:], embeddings.sincos_1d([0], 4)[0], atol=1e-7)


# ---- grouped-query heads, per-modality projections, the cache -------------------------


def test_grouped_query_attention_equals_repeated_heads():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(np.arange(7) < np.array([[7], [3]]))[:, None, None, :]
  repeated = lambda x: jnp.repeat(x, 3, axis=2)  # query heads 0-2 share kv head 0, ...
  for impl in ("explicit", "xla"):
    got = attention_op.attention_op(q, k, v, mask, implementation=impl)
    want = attention_op.attention_op(q, repeated(k), repeated(v), mask, implementation="explicit")
    np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="multiple"):
    attention_op.attention_op(q, k[:, :, :1].repeat(4, axis=2), v[:, :, :1].repeat(4, axis=2))


def test_per_modality_key_value_equals_two_projections_masked_by_modality():
  layer = attentions.MultiHeadAttention(4, 8, 32, num_kv_heads=2, num_modalities=2,
                                        use_bias=True)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  modality = jnp.asarray([[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 1]])
  params = nn.unbox(layer.init(jax.random.key(0), x, modality=modality))["params"]
  assert params["key"]["kernel"].shape == (2, 32, 2, 8)
  assert not np.allclose(params["key"]["kernel"][0], params["key"]["kernel"][1])
  got = layer.apply({"params": params}, x, modality=modality)

  def project(p, m):
    return jnp.einsum("bte,ehd->bthd", x, p["kernel"][m]) + p["bias"][m]

  sel = modality[..., None, None] == 1
  k = jnp.where(sel, project(params["key"], 1), project(params["key"], 0))
  v = jnp.where(sel, project(params["value"], 1), project(params["value"], 0))
  q = jnp.einsum("bte,ehd->bthd", x, params["query"]["kernel"]) + params["query"]["bias"]
  ctx = attention_op.attention_op(q, k, v, implementation="explicit")
  want = jnp.einsum("bthd,hde->bte", ctx, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # All text: copy 0 only.
  np.testing.assert_allclose(
      layer.apply({"params": params}, x, modality=jnp.zeros_like(modality)),
      layer.apply({"params": params}, x, modality=None), atol=0)
  stacked = jnp.stack([jnp.zeros((2, 6)), jnp.ones((2, 6))])
  np.testing.assert_array_equal(multiway.select(stacked, modality), modality)


def test_cached_decoding_with_rope_equals_the_full_causal_pass():
  """Prefill 3 tokens into the cache, then 2 single-token steps: the same outputs as one
  causal pass over all 5, with rotary positions; `cache_mask` hides a padded slot."""
  layer = attentions.MultiHeadAttention(4, 8, 32, num_kv_heads=2, rope_theta=10000.0,
                                        use_bias=False, implementation="explicit")
  cached = layer.clone(cache="self")
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 5, 32)), jnp.float32)
  pos = jnp.arange(5)[None]
  params = layer.init(jax.random.key(0), x)["params"]
  causal = jnp.tril(jnp.ones((5, 5), bool))[None, None]
  full = layer.apply({"params": params}, x, mask=causal, positions=pos)
  _, cache = cached.apply({"params": params}, jnp.zeros((1, 5, 32)), mutable=["cache"])
  outs = []
  for start, stop in ((0, 3), (3, 4), (4, 5)):
    out, cache = cached.apply({"params": params, **cache}, x[:, start:stop],
                              positions=pos[:, start:stop], mutable=["cache"])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  # A padded slot (position 1) masked out of the cache = the pass without that token.
  keep = jnp.asarray([[1, 0, 1, 1, 1]])
  _, cache = cached.apply({"params": params}, jnp.zeros((1, 5, 32)), mutable=["cache"])
  _, cache = cached.apply({"params": params, **cache}, x[:, :3], positions=pos[:, :3],
                          cache_mask=keep, mutable=["cache"])
  last, _ = cached.apply({"params": params, **cache}, x[:, 3:4], positions=pos[:, 3:4],
                         cache_mask=keep, mutable=["cache"])
  rows = jnp.asarray([0, 2, 3])
  alone = layer.apply({"params": params}, x[:, rows], mask=jnp.tril(jnp.ones((3, 3), bool))[None, None],
                      positions=pos[:, rows])
  np.testing.assert_allclose(last[:, 0], alone[:, -1], atol=1e-5)


# ---- MLP, norms, stacks ---------------------------------------------------------------------


def test_gated_mlp_with_inner_norm_by_hand():
  block = mlp.Mlp(6, 4, act="silu", gated=True, inner_norm_eps=1e-6)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 4)), jnp.float32)
  p = nn.unbox(block.init(jax.random.key(0), x))["params"]
  h = jax.nn.silu(x @ p["gate"]["kernel"] + p["gate"]["bias"]) * (x @ p["wi"]["kernel"] + p["wi"]["bias"])
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = h * p["inner_norm"]["scale"] + p["inner_norm"]["bias"]
  np.testing.assert_allclose(block.apply({"params": p}, x), h @ p["wo"]["kernel"] + p["wo"]["bias"],
                             atol=1e-5)


def test_rmsnorm_by_hand():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8)), jnp.float32)
  norm = norms.Norm(1e-6, kind="rmsnorm")
  p = norm.init(jax.random.key(0), x)
  want = x / jnp.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(norm.apply(p, x), want, atol=1e-6)


@pytest.mark.parametrize("policy", sorted(stack.REMAT_POLICIES))
def test_every_remat_preset_gives_the_same_gradients(policy):
  """The named policies (over `checkpoint_name` tags) change memory, never numbers."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = attentions.MultiHeadAttention(2, 4, 8, implementation="explicit")(x)
      return x + mlp.Mlp(16, 8, act="gelu")(x + h), None

  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 8)), jnp.float32)

  def grads(name):
    model = stack.stack(Block, 2, name, broadcast_args=1)()
    params = model.init(jax.random.key(0), x, None)
    return jax.grad(lambda p: (model.apply(p, x, None)[0] ** 2).sum())(params)

  ref, got = grads("none"), grads(policy)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-5)
