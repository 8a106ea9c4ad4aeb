"""mPLUG-Owl2 inference: jitted generation over batches (chat, evaluation).

  generate_fn(model_cfg, settings) -> (params, batch, rngs) -> generation.Generated

`settings` (`default_settings()`): max_new_tokens, temperature (<= 0: greedy), top_k,
top_p, stop_on_eos. `batch` holds input_ids, attention_mask and, with images, images
(B, K, S, S, 3) and image_mask (B, K) (`schema.py`); optional stop_sequences (S, M)
(`generation.stop_sequence_array`) and max_new (B,). Defaults: the official CLI
(`serve/cli.py`: sampling at temperature 0.2, 512 new tokens, stop on `</s>`).
"""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections

from mplug2_jax.models.owl2 import generation, model as model_lib


def default_settings() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.max_new_tokens = 512
  s.temperature = 0.2         # <= 0: greedy (official benchmarks: greedy, 10-60 tokens)
  s.top_k = 0                 # 0 = no top-k restriction
  s.top_p = 1.0               # 1.0 = no nucleus restriction
  s.stop_on_eos = True        # stop a row after </s>
  return s


def generate_fn(model_cfg: ml_collections.ConfigDict,
                settings: ml_collections.ConfigDict) -> Callable:
  """A jitted `(params, batch, rngs) -> Generated` for `settings` (one compile per batch
  shape)."""
  model = model_lib.build(model_cfg, use_cache=True)
  eos = int(model_cfg.llm.eos_token_id) if settings.stop_on_eos else None

  @jax.jit
  def run(params, batch, rngs=None):
    return generation.generate(
        model, params, batch["input_ids"], batch["attention_mask"], batch.get("images"),
        batch.get("image_mask"), max_new_tokens=int(settings.max_new_tokens),
        temperature=float(settings.temperature), top_k=int(settings.top_k),
        top_p=float(settings.top_p), eos_id=eos, pad_id=int(model_cfg.llm.pad_token_id),
        stop_sequences=batch.get("stop_sequences"), max_new=batch.get("max_new"), rngs=rngs)

  return run
