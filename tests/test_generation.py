"""Decoding: the official beam-search semantics against exhaustive enumeration, cached ==
uncached decoding, and the cached search on the golden generation cases."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax.convert.mplug2 import parity
from mplug2_jax.models import mplug2
from mplug2_jax.models.mplug2 import generation

V, BOS, EOS = 5, 0, 2


def markov_logits(seed):
  """A toy decoder: next-token logits depend on the last token and the position."""
  rng = np.random.default_rng(seed)
  by_token = rng.normal(size=(V, V)) * 2.0
  by_step = rng.normal(size=(8, V))
  return lambda last, step: by_token[last] + by_step[step]


def exhaustive(logits_fn, min_length, max_length):
  """The official rules by brute force: at every step every continuation of every prefix
  is a candidate; those ending with EOS are hypotheses, the sample ends when the best
  candidate ends with EOS (or at the last step, when all are hypotheses); best wins."""
  best = (-np.inf, None)
  for step in range(max_length):
    lp = ((5.0 + step + 1.0) / 6.0) ** 0.6
    candidates = []
    for seq in itertools.product(range(V), repeat=step + 1):
      logp, last = 0.0, BOS
      for t, token in enumerate(seq):
        logits = logits_fn(last, t)
        lps = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        if t < min_length:
          lps[EOS] = -1e20
        logp += lps[token]
        last = token
      candidates.append((logp / lp, seq))
    top_score, top_seq = max(candidates, key=lambda c: c[0])
    last_step = step == max_length - 1
    ends = top_seq[-1] == EOS or last_step
    for score, seq in candidates:
      if (seq[-1] == EOS or ends) and score > best[0]:
        best = (score, seq)
    if ends:
      return best


@pytest.mark.parametrize("seed,min_length,max_length", [(0, 1, 4), (1, 0, 4), (2, 2, 4), (3, 1, 3)])
def test_wide_beam_search_equals_exhaustive_search(seed, min_length, max_length):
  logits_fn = markov_logits(seed)
  beams = V ** max_length  # wide enough to never drop a candidate

  def step_fn(carry, seqs, step):
    last = jnp.take(seqs, step, axis=1)
    table = jnp.asarray(np.stack([[logits_fn(a, t) for a in range(V)] for t in range(8)]),
                        jnp.float32)
    return table[step][last], carry

  result = jax.jit(lambda: generation.search(
      step_fn, lambda c, r: c, None, 1, beam_size=beams, min_length=min_length,
      max_length=max_length, bos_id=BOS, eos_id=EOS))()
  score, seq = exhaustive(logits_fn, min_length, max_length)
  length = int(result.lengths[0])
  assert tuple(np.asarray(result.ids[0, 1:length])) == seq
  np.testing.assert_allclose(float(result.scores[0]), score, rtol=1e-5)


@pytest.fixture(scope="module")
def golden_videoqa(shared_dir):
  case_dir = shared_dir / "golden" / "mplug2" / "videoqa_video"
  case, model_cfg, state, inputs, outputs = parity.load_case(case_dir)
  batch = parity.to_batch(case["task"], inputs)
  params = parity.import_params(model_cfg, state, batch)
  model = mplug2.build(model_cfg)
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  image, _ = apply(mplug2.Mplug2.embed_image, batch["video"])
  image_mask = jnp.ones(image.shape[:2], jnp.int32)
  question, _ = apply(mplug2.Mplug2.embed_text, batch["text_ids"], batch["text_mask"])
  fused = apply(mplug2.Mplug2.fuse, image, image_mask, question, batch["text_mask"])
  states, mask = mplug2.answer_encoder_states(*fused[:1], image_mask, fused[1],
                                              batch["text_mask"], None)
  return case, model_cfg, params, states, mask, outputs


def test_cached_decoding_equals_full_recompute(golden_videoqa):
  _, model_cfg, params, states, mask, _ = golden_videoqa
  ids = jnp.asarray(np.random.default_rng(0).integers(104, 512, (states.shape[0], 7)), jnp.int32)
  ids = ids.at[:, 0].set(101)
  full, _ = mplug2.build(model_cfg).apply({"params": params}, ids, jnp.ones_like(ids), states, mask,
                                          method=mplug2.Mplug2.decode)
  cached_model = mplug2.build(model_cfg, use_cache=True)
  _, variables = cached_model.apply({"params": params}, jnp.ones_like(ids), jnp.ones_like(ids),
                                    states, mask, method=mplug2.Mplug2.decode, mutable=["cache"])
  cache = variables["cache"]
  for t in range(ids.shape[1]):
    (step_logits, _), variables = cached_model.apply(
        {"params": params, "cache": cache}, ids[:, t:t + 1], jnp.ones_like(ids[:, :1]), states,
        mask, jnp.full((ids.shape[0], 1), t), method=mplug2.Mplug2.decode, mutable=["cache"])
    cache = variables["cache"]
    np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=2e-5)


def test_cached_beam_search_matches_official_ids(golden_videoqa):
  case, model_cfg, params, states, mask, outputs = golden_videoqa
  gen = case["generation"]
  model = mplug2.build(model_cfg, use_cache=True)
  for name, beams in (("beam", gen["beam_size"]), ("greedy", 1)):
    result = jax.jit(lambda s, m, beams=beams: generation.beam_search_cached(
        model, params, s, m, beam_size=beams, min_length=gen["min_length"],
        max_length=gen["max_length"]))(states, mask)
    np.testing.assert_array_equal(result.ids, outputs[f"generate_{name}_ids"])
    np.testing.assert_array_equal(result.lengths, outputs[f"generate_{name}_lengths"])
    np.testing.assert_allclose(result.scores, outputs[f"generate_{name}_scores"], atol=1e-4)
