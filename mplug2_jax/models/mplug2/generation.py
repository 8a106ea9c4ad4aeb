"""Decoding for the shared text decoder: the official beam search, greedy, answer ranking.

Spec: `shared/spec/mplug2.md` section 9 (beam search) and 6.2 (`rank_answer`).

The beam search reproduces the official `TextGenerator` with static shapes so it compiles
once per (batch, beams, max_length): sequences live in a (B, K, max_length + 1) buffer,
the decoder re-reads the whole prefix each step (causal attention makes the padded future
positions irrelevant), and instead of growing per-sample hypothesis lists we keep each
sample's best finished hypothesis so far: the official list is sorted by score with a
stable sort and only the best is returned, so a running maximum with strict `>` (earlier
insertions win ties) gives the same answer. Encoder states are computed once per sample
and shared by its K beams.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mplug2_jax.models.mplug2 import model as model_lib
from mplug2_jax.models.mplug2 import objectives
from mplug2_jax.tokens import BERT_CLS_ID as CLS, BERT_PAD_ID as PAD, BERT_SEP_ID as SEP
from mplug2_jax.tokens import IGNORE_INDEX
LENGTH_PENALTY_ALPHA = 0.6
MIN_LENGTH_PENALTY = -1e20

# decode_fn(ids (N, L), mask (N, L), encoder_states (N, S, D), encoder_mask (N, S)) -> logits
DecodeFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class Generated(NamedTuple):
  ids: jax.Array      # (B, max_length + 1) best hypothesis, [CLS] first, right-padded with 0
  lengths: jax.Array  # (B,) valid tokens including [CLS]
  scores: jax.Array   # (B,) length-penalised log-probability of the hypothesis


def length_penalty(step) -> jax.Array:
  return ((5.0 + step + 1.0) / 6.0) ** LENGTH_PENALTY_ALPHA


# step_fn(carry, seqs (B*K, max_length + 1), step) -> (logits (B*K, V) for position `step`,
# carry); reorder_fn(carry, rows (B*K,)) -> carry with its rows gathered (beam reordering).
StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]


def beam_search(decode_fn: DecodeFn, encoder_states: jax.Array, encoder_mask: jax.Array, *,
                beam_size: int, min_length: int, max_length: int) -> Generated:
  """Official beam search, re-reading the whole prefix each step as the official code
  does (beam_size 1 = the official greedy decoding)."""
  k, total = beam_size, max_length + 1
  states = jnp.repeat(encoder_states, k, axis=0)  # sample-major, like the official tile
  states_mask = jnp.repeat(encoder_mask, k, axis=0)
  ones = jnp.ones((states.shape[0], total), jnp.int32)

  def step_fn(carry, seqs, step):
    logits = decode_fn(seqs, ones, states, states_mask)
    return jnp.take(logits, step, axis=1), carry

  return search(step_fn, lambda carry, rows: carry, None, encoder_states.shape[0],
                beam_size=beam_size, min_length=min_length, max_length=max_length)


def beam_search_cached(model, params, encoder_states: jax.Array, encoder_mask: jax.Array, *,
                       beam_size: int, min_length: int, max_length: int) -> Generated:
  """The same search with key/value caches: one decoder position per step, and the
  encoder keys/values projected once per sample. `model` is built with `use_cache=True`.

  The caches are primed on the B samples (not the B x K beams) and then repeated for the
  beams: a sample's beams share its encoder keys/values, which are therefore never
  reordered; only the self-attention caches follow the beams.
  """
  k, total = beam_size, max_length + 1
  batch = encoder_states.shape[0]
  rows = batch * k
  ones = jnp.ones((batch, total), jnp.int32)
  _, variables = model.apply({"params": params}, ones, ones, encoder_states, encoder_mask,
                             method=model_lib.Mplug2.decode, mutable=["cache"])
  # Stacked layer caches are (layers, rows, ...); the write index (layers,) is shared.
  cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1) if c.ndim > 1 else c,
                       variables["cache"])
  states_mask = jnp.repeat(encoder_mask, k, axis=0)
  # Only the cross-attention's projection input: its cached keys/values are used instead.
  states = jnp.zeros((rows, 1, encoder_states.shape[-1]), encoder_states.dtype)
  one = jnp.ones((rows, 1), jnp.int32)

  def step_fn(cache, seqs, step):
    token = jax.lax.dynamic_slice_in_dim(seqs, step, 1, axis=1)
    positions = jnp.full((rows, 1), step, jnp.int32)
    (logits, _), variables = model.apply(
        {"params": params, "cache": cache}, token, one, states, states_mask, positions,
        method=model_lib.Mplug2.decode, mutable=["cache"])
    return logits[:, 0], variables["cache"]

  def reorder(cache, origin_rows):
    def one(path, c):
      cross = any(getattr(p, "key", None) == "cross_attn" for p in path)
      return c if cross or c.ndim == 1 else jnp.take(c, origin_rows, axis=1)
    return jax.tree_util.tree_map_with_path(one, cache)

  return search(step_fn, reorder, cache, batch, beam_size=beam_size, min_length=min_length,
                max_length=max_length)


def search(step_fn: StepFn, reorder_fn: ReorderFn, carry: Any, batch: int, *, beam_size: int,
           min_length: int, max_length: int, bos_id: int = CLS, eos_id: int = SEP) -> Generated:
  """The official beam-search bookkeeping over any decoder step (spec section 9)."""
  k, total = beam_size, max_length + 1
  seqs = jnp.zeros((batch, k, total), jnp.int32).at[:, :, 0].set(bos_id)
  cum = jnp.full((batch, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  init = dict(seqs=seqs, cum=cum, carry=carry, ended=jnp.zeros((batch,), bool),
              best_score=jnp.full((batch,), -jnp.inf, jnp.float32),
              best_seq=jnp.zeros((batch, total), jnp.int32),
              best_len=jnp.zeros((batch,), jnp.int32), has_best=jnp.zeros((batch,), bool))

  def step_body(step, s):
    logits, carry = step_fn(s["carry"], s["seqs"].reshape(batch * k, total), step)
    log_probs = jnp.log(jax.nn.softmax(logits.astype(jnp.float32), axis=-1)).reshape(batch, k, -1)
    vocab = log_probs.shape[-1]
    log_probs = jnp.where((step < min_length) & (jnp.arange(vocab) == eos_id),
                          MIN_LENGTH_PENALTY, log_probs)
    lp = length_penalty(step)
    scores = ((s["cum"][:, :, None] + log_probs) / lp).reshape(batch, k * vocab)
    top_scores, top_ids = jax.lax.top_k(scores, k)
    origin, token = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(s["seqs"], origin[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], step + 1, axis=2)
    carry = reorder_fn(carry, (origin + jnp.arange(batch)[:, None] * k).reshape(-1))
    finished = (token == eos_id) | (step == max_length - 1)
    sample_ends = finished[:, 0] & ~s["ended"]
    record = (finished | sample_ends[:, None]) & ~s["ended"][:, None]

    # Candidates are appended in top-k order, i.e. by descending score: the first recorded
    # one is this step's best, and earlier hypotheses win ties (stable sort).
    first = jnp.argmax(record, axis=1)
    score = jnp.take_along_axis(top_scores, first[:, None], axis=1)[:, 0]
    better = record.any(axis=1) & (~s["has_best"] | (score > s["best_score"]))
    best_score = jnp.where(better, score, s["best_score"])
    best_seq = jnp.where(better[:, None],
                         jnp.take_along_axis(seqs, first[:, None, None], axis=1)[:, 0],
                         s["best_seq"])
    best_len = jnp.where(better, step + 2, s["best_len"])
    has_best = s["has_best"] | better
    return dict(seqs=seqs, cum=top_scores * lp, carry=carry, ended=s["ended"] | sample_ends,
                best_score=best_score, best_seq=best_seq, best_len=best_len, has_best=has_best)

  s = jax.lax.fori_loop(0, max_length, step_body, init)
  keep = jnp.arange(total)[None] < s["best_len"][:, None]
  return Generated(jnp.where(keep, s["best_seq"], PAD), s["best_len"], s["best_score"])


def rank_answers(decode_fn: DecodeFn, encoder_states: jax.Array, encoder_mask: jax.Array,
                 answer_ids: jax.Array, answer_mask: jax.Array, k: int,
                 count_first_token_twice: bool = True):
  """Official `rank_answer`: first-token shortlist of k candidates, then re-rank by
  log p(first token) + log p(whole answer). The official score counts the first token
  twice (spec 6.2); `count_first_token_twice=False` scores by log p(whole answer) alone.

  Returns (ids (B, k) into the answer list, probabilities (B, k)), best first.
  """
  batch = encoder_states.shape[0]
  start = jnp.full((batch, 1), CLS, jnp.int32).at[:, 0].set(answer_ids[0, 0])
  logits = decode_fn(start, jnp.ones_like(start), encoder_states, encoder_mask)[:, 0]
  first_probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, answer_ids[:, 1]]
  top_probs, top_ids = jax.lax.top_k(first_probs, k)                  # (B, k)
  cand_ids = answer_ids[top_ids].reshape(batch * k, -1)
  cand_mask = answer_mask[top_ids].reshape(batch * k, -1)
  labels = jnp.where(cand_ids == PAD, IGNORE_INDEX, cand_ids)
  cand_logits = decode_fn(cand_ids, cand_mask, jnp.repeat(encoder_states, k, axis=0),
                          jnp.repeat(encoder_mask, k, axis=0))
  seq_loss = objectives.answer_sequence_losses(cand_logits, labels).reshape(batch, k)
  scores = -seq_loss + (jnp.log(top_probs) if count_first_token_twice else 0.0)
  probs = jax.nn.softmax(scores, axis=-1)
  probs, order = jax.lax.top_k(probs, k)
  return jnp.take_along_axis(top_ids, order, axis=1), probs
