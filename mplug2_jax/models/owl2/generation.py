"""Prefill + cached decoding for mPLUG-Owl2, with static shapes and right batching.

  generate(model, params, input_ids, attention_mask, images, image_mask, ...) -> Generated

The prompt (B, L) is spliced (`model.splice`) to P positions and run once through the
decoder, filling a key/value cache of P + max_new_tokens slots; then one token per step
is fed at its row's next position id (`cumsum(mask)` continues: a padded row's tokens
have the positions they have alone) and attends to its row's real prompt positions and its
generated tokens (`cache_mask`: the prompt mask, then ones). Generated tokens are text
tokens (modality 0). So every row generates what its prompt generates alone, whatever
the padding side, the other rows' lengths or image counts (official bugs 1-4: the
official batched `generate` shifts positions, unmasks padding and crashes on mixed image
counts).

Token choice per step: greedy (`temperature <= 0`), or sampling from softmax(logits / T)
restricted to the `top_k` most likely tokens (0 = all) and to the smallest set whose
probability reaches `top_p` (1.0 = all). Each row samples with its own key (`rngs`,
folded with the step), so a row's sample does not depend on the batch it is in. A row
stops after `eos_id` (when given), after any of `stop_sequences` (token-id suffixes), or
after its own `max_new` tokens; the loop ends when every row has stopped. Tokens after a
row's stop are `pad_id`; `lengths` counts each row's tokens including the stop token.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mplug2_jax.models.owl2 import model as model_lib

Array = Any


class Generated(NamedTuple):
  tokens: Array          # (B, max_new_tokens) int32, pad after each row's stop
  lengths: Array         # (B,) int32 tokens generated, the stop token included
  logits: Array | None   # (B, max_new_tokens, V) float32 each step's logits (return_logits)


def stop_sequence_array(sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """Token-id stop sequences -> (S, M) int32, right-aligned, -1 where a shorter sequence
  has nothing (matches any token)."""
  sequences = [list(s) for s in sequences if len(s)]
  width = max((len(s) for s in sequences), default=1)
  out = np.full((max(len(sequences), 1), width), -1, np.int32)
  if not sequences:
    out[:] = -3  # matches nothing: no real token is negative
  for i, s in enumerate(sequences):
    out[i, width - len(s):] = s
  return out


def choose_tokens(logits: Array, keys: Array | None, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> Array:
  """(B, V) logits -> (B,) token ids: greedy, or sampled per row with its key."""
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  if top_k and top_k < scaled.shape[-1]:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  if top_p < 1.0:
    ordered = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs       # mass of the more likely tokens
    kept = jnp.where(before < top_p, ordered, jnp.inf)
    scaled = jnp.where(scaled < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, scaled)
  return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def init_cache(model, params, batch: int, length: int, width: int) -> dict:
  """Zero key/value caches of `length` slots (shapes by `eval_shape`: nothing runs)."""
  def prime(p):
    zeros = jnp.zeros((batch, length), jnp.int32)
    _, variables = model.apply({"params": p}, jnp.zeros((batch, length, width), model_dtype(model)),
                               zeros, zeros, zeros, jnp.ones((batch, length), jnp.int32),
                               method=model_lib.Owl2.llm_states, mutable=["cache"])
    return variables["cache"]

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shapes = jax.eval_shape(prime, abstract)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def model_dtype(model) -> Any:
  return jnp.dtype(model.config.dtype)


def generate(model, params, input_ids: Array, attention_mask: Array,
             images: Array | None = None, image_mask: Array | None = None, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             stop_sequences: Array | None = None, max_new: Array | None = None,
             rngs: Array | None = None, return_logits: bool = False) -> Generated:
  """See the module doc. `model` is built with `use_cache=True`; `rngs` (B,) keys are
  needed when sampling; `max_new` (B,) per-row limits (<= max_new_tokens)."""
  if not model.use_cache:
    raise ValueError("generate needs the model built with use_cache=True")
  if temperature > 0.0 and rngs is None:
    raise ValueError("sampling (temperature > 0) needs per-row rngs")
  variables = {"params": params}
  seq, _ = model.apply(variables, input_ids, attention_mask, None, images, image_mask,
                       method=model_lib.Owl2.embed_inputs)
  b, prompt, width = seq["embeds"].shape
  total = prompt + max_new_tokens
  cache_mask = jnp.concatenate([seq["mask"], jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
  cache = init_cache(model, params, b, total, width)
  (states, _), updated = model.apply(
      {"params": params, "cache": cache}, seq["embeds"], seq["modality"], seq["positions"],
      seq["mask"], cache_mask, method=model_lib.Owl2.llm_states, mutable=["cache"])
  rows = jnp.arange(b)
  last = model_lib.last_positions(seq["mask"])
  logits = model.apply(variables, states[rows, last], method=model_lib.Owl2.logits)
  next_position = seq["positions"][rows, last] + 1
  stops = None if stop_sequences is None else jnp.asarray(stop_sequences, jnp.int32)
  limit = (jnp.full((b,), max_new_tokens, jnp.int32) if max_new is None
           else jnp.minimum(jnp.asarray(max_new, jnp.int32), max_new_tokens))

  def step_logits(cache, tokens, step):
    positions = (next_position + step)[:, None]
    states, updated = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                  positions, cache_mask, method=model_lib.Owl2.token_states,
                                  mutable=["cache"])
    return model.apply(variables, states[:, 0], method=model_lib.Owl2.logits), updated["cache"]

  state = dict(
      step=jnp.zeros((), jnp.int32), logits=logits, cache=updated["cache"],
      tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      lengths=jnp.zeros((b,), jnp.int32), done=limit <= 0,
      recent=jnp.full((b, 1 if stops is None else stops.shape[1]), -2, jnp.int32))
  if return_logits:
    state["all_logits"] = jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32)

  def cond(s):
    return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

  def body(s):
    step, active = s["step"], ~s["done"]
    keys = None if rngs is None else jax.vmap(jax.random.fold_in, (0, None))(rngs, step)
    token = choose_tokens(s["logits"], keys, temperature=temperature, top_k=top_k,
                          top_p=top_p)
    token = jnp.where(active, token, pad_id)
    out = dict(s, tokens=s["tokens"].at[:, step].set(token),
               lengths=s["lengths"] + active.astype(jnp.int32), step=step + 1)
    stop = out["lengths"] >= limit
    if eos_id is not None:
      stop |= token == eos_id
    if stops is not None:
      recent = jnp.concatenate([s["recent"][:, 1:], token[:, None]], axis=1)
      out["recent"] = recent
      stop |= jnp.any(jnp.all((stops[None] == -1) | (recent[:, None] == stops[None]), axis=-1),
                      axis=-1)
    out["done"] = s["done"] | (active & stop)
    if return_logits:
      out["all_logits"] = s["all_logits"].at[:, step].set(
          jnp.where(active[:, None], s["logits"], 0.0))
    more = (step + 1 < max_new_tokens) & ~jnp.all(out["done"])
    out["logits"], out["cache"] = jax.lax.cond(
        more, step_logits, lambda c, t, i: (s["logits"], c), s["cache"], token, step)
    return out

  final = jax.lax.while_loop(cond, body, state)
  return Generated(final["tokens"], final["lengths"],
                   final["all_logits"] if return_logits else None)
