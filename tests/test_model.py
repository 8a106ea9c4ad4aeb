"""Tiny-config forward passes: every task, image and video input, every head."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax import experiment
from mplug2_jax.models import mplug2, vit
from conftest import dummy_batch

B, L = 2, 6


def make(task, frames, **model_overrides):
  config = experiment.base_config("tiny", task)
  config.model.num_frames = frames
  config.model.num_classes = 7
  config.model.update(model_overrides)
  batch = dummy_batch(config.model, B, L, answers_per_question=2)
  rng = np.random.default_rng(0)
  batch["video"] = jnp.asarray(rng.normal(size=batch["video"].shape), jnp.float32)
  for name in batch:
    if name.endswith("_ids") and batch[name].ndim == 2:
      ids = rng.integers(104, config.model.text.vocab_size, batch[name].shape)
      ids[:, 0] = 101
      batch[name] = jnp.asarray(ids, jnp.int32)
    if name.endswith("_mask"):
      batch[name] = batch[name].at[0, L - 2:].set(0)  # padding in the first row
  return config, batch


@functools.lru_cache(maxsize=None)
def _init(task, extra):
  """Parameters do not depend on the frame count: one init per task (compiling init is
  the slow part of these tests)."""
  config, batch = make(task, 1, **dict(extra))
  return jax.jit(mplug2.build(config.model).init)(jax.random.key(0), batch)


def run(config, batch, **build_kw):
  model = mplug2.build(config.model, **build_kw)
  params = _init(config.model.task, ())
  return jax.jit(model.apply)(params, batch)


@pytest.mark.parametrize("frames", [4, 1], ids=["video", "image"])
@pytest.mark.parametrize("task", ["caption", "videoqa", "retrieval", "pretrain", "grounding",
                                  "classification"])
def test_forward_shapes_and_finite(task, frames):
  config, batch = make(task, frames)
  out, aux = run(config, batch)
  m = config.model
  vocab, width = m.text.vocab_size, m.text.hidden_size
  tokens = vit.num_tokens(m.vision, m.image_size, frames)
  assert tokens == 1 + frames * (m.image_size // m.vision.patch_size) ** 2
  for name, value in {**out, **aux}.items():
    assert np.all(np.isfinite(np.asarray(value, np.float32))), name
  if task == "classification":
    assert out["class_logits"].shape == (B, 7)
    return
  assert aux["vision_tokens"].shape == (B, tokens, m.vision.width)
  assert aux["image_embeds"].shape == (B, tokens, width)
  assert aux["universal_v_layer0"].shape == (B, m.text.num_latents, width)
  if task == "caption":
    assert out["logits"].shape == (B, L, vocab)
  if task == "pretrain":  # prefix-LM: the decoder reads the text, given the image
    assert out["logits"].shape == (B, L, vocab)
  if task in ("videoqa", "grounding"):  # K = 2 answers per question; one box per expression
    rows, length = (2 * B, L) if task == "videoqa" else (B, 5)
    assert out["logits"].shape == (rows, length, vocab)
    assert aux["decoder_encoder_hidden_states"].shape == (rows, tokens + L, width)
  if task in ("retrieval", "pretrain"):
    assert out["image_feat"].shape == out["text_feat"].shape == (B, m.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out["image_feat"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_feat"], axis=-1), 1.0, rtol=1e-5)
    assert out["itm_logits"].shape == (B, 2)
    np.testing.assert_allclose(out["temp"], m.temp, rtol=1e-6)
  if task == "pretrain":
    assert out["mlm_logits"].shape == (B, L, vocab)


def test_image_is_a_one_frame_video():
  """The video class token is the frame mean: for T=1 the frame's own class token."""
  config, batch = make("caption", 1)
  _, aux = run(config, batch, collect=True)
  last_block = aux["vision_block_outputs"][-1]            # (B*T, 1+G², C), before ln_post
  assert last_block.shape[0] == B


def test_fresh_temporal_adapters_are_identity():
  """up-projections start at zero, so a fresh model ignores frame order (spec 2.1)."""
  config, batch = make("caption", 4)
  model = mplug2.build(config.model)
  params = _init("caption", ())
  apply = jax.jit(lambda p, v: model.apply(p, v, method=mplug2.Mplug2.embed_image)[0])
  reversed_video = batch["video"][:, ::-1]
  a, b = apply(params, batch["video"]), apply(params, reversed_video)
  # Same class token (mean over frames) and the same patch tokens in reversed frame order.
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_do_not_change_outputs(policy):
  config, batch = make("videoqa", 2)
  base, _ = run(config, batch)
  config.model.remat_policy = policy
  out, _ = run(config, batch)
  np.testing.assert_allclose(out["logits"], base["logits"], atol=1e-5)


def test_bfloat16_compute_with_float32_params():
  config, batch = make("caption", 2)
  ref, _ = run(config, batch)
  config.model.dtype = "bfloat16"
  model = mplug2.build(config.model)
  params = _init("caption", ())
  leaves = jax.tree.leaves(params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  out, aux = jax.jit(model.apply)(params, batch)
  assert aux["image_embeds"].dtype == jnp.bfloat16
  assert out["logits"].dtype == jnp.float32
  # Same weights (same init rng): bf16 logits track the fp32 ones.
  assert np.corrcoef(np.ravel(out["logits"]), np.ravel(ref["logits"]))[0, 1] > 0.99


def test_training_mode_uses_dropout():
  config, batch = make("videoqa", 2)
  model = mplug2.build(config.model, deterministic=False)
  params = _init("videoqa", ())
  apply = jax.jit(lambda p, r: model.apply(p, batch, rngs={"dropout": r})[0]["logits"])
  a, b = apply(params, jax.random.key(1)), apply(params, jax.random.key(2))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)


def test_auto_attention_is_xla_on_cpu():
  """`attention="auto"` picks cuDNN only on GPU with bf16/fp16; on CPU it is the XLA path."""
  config, batch = make("caption", 2)
  ref, _ = run(config, batch)
  config.model.attention = "auto"
  out, _ = run(config, batch)
  np.testing.assert_array_equal(out["logits"], ref["logits"])


def test_patch_embed_matmul_equals_convolution():
  """The one-frame patch embedding as a matmul over patches equals the convolution
  (including a size that leaves a remainder, which a VALID convolution drops)."""
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(2, 3, 35, 33, 3)), jnp.float32)
  embed = vit.PatchEmbed(8, 7)
  params = embed.init(jax.random.key(0), video)
  got = embed.apply(params, video)
  kernel = nn.unbox(params)["params"]["kernel"]
  want = jax.lax.conv_general_dilated(video, kernel, (1, 7, 7), "VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  assert got.shape == want.shape == (2, 3, 5, 4, 8)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
