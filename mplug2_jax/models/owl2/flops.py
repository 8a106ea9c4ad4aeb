"""Analytic FLOPs of one mPLUG-Owl2 train step, from the config and the batch shapes.

  train_step_flops(config, shapes) -> float      (whole global batch, one optimizer step)
  forward_flops(model_cfg, shapes) -> dict       forward FLOPs per tower

Counted: every matrix multiplication as the model runs it (2 FLOPs per multiply-add):
the ViT on every image slot (B x K images; empty slots run too, static shapes), the
abstractor (queries attend to Q + T keys), the LLM over the spliced length
P = L + K (Q + 1 - 1) with both modality copies of the K/V projections (the multiway
module computes both, `layers/multiway.py`) and full (masked) attention scores, and the
LM head on every position. A tower whose parameters are all frozen
(`config.optimizer.frozen`, e.g. the official `^vision/`) counts its forward once (no
gradient flows below it: the ViT is the first tower); trainable towers count 3x (forward,
input gradient, weight gradient), the patch embedding 2x. Not counted: element-wise work
(norms, softmax, activations, RoPE, the optimizer update). XLA's cost analysis counts a
scanned stack's body once, so it is no substitute for this count.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import ml_collections

from mplug2_jax.models import vit
from mplug2_jax.models.owl2 import config as owl2_config


def dense(tokens: float, d_in: int, d_out: int) -> float:
  return 2.0 * tokens * d_in * d_out


def attention(rows: float, q_len: int, kv_len: int, width: int, heads: int, kv_heads: int,
              head_dim: int, kv_copies: int = 1) -> float:
  """q / k / v / out projections (k and v `kv_copies` times) + scores + weighted values."""
  proj = dense(rows * q_len, width, heads * head_dim) * 2
  proj += dense(rows * kv_len, width, kv_heads * head_dim) * 2 * kv_copies
  return proj + 2 * (2.0 * rows * q_len * kv_len * heads * head_dim)


def vision_flops(m: ml_collections.ConfigDict, images: int) -> tuple[float, float]:
  """(patch embedding, transformer blocks) forward FLOPs of `images` images."""
  v = m.vision
  p, w = v.patch_size, v.width
  tokens = owl2_config.vision_tokens(m)
  embed = dense(images * (tokens - 1), p * p * 3, w)
  heads = w // v.head_dim
  block = attention(images, tokens, tokens, w, heads, heads, v.head_dim)
  block += 2 * dense(images * tokens, w, vit.mlp_width(v))
  return embed, v.layers * block


def abstractor_flops(m: ml_collections.ConfigDict, images: int) -> float:
  a = m.abstractor
  d, q = a.hidden_size, a.num_queries
  keys = q + owl2_config.vision_tokens(m)
  head_dim = d // a.num_heads
  layer = attention(images, q, keys, d, a.num_heads, a.num_heads, head_dim)
  layer += 3 * dense(images * q, d, a.intermediate_size)   # w1, w3, w2
  return a.layers * layer + dense(images * q, d, m.llm.hidden_size)


def llm_flops(m: ml_collections.ConfigDict, rows: int, length: int) -> float:
  t = m.llm
  head_dim = t.hidden_size // t.num_heads
  layer = attention(rows, length, length, t.hidden_size, t.num_heads, t.num_kv_heads,
                    head_dim, kv_copies=t.num_modalities)
  layer += 3 * dense(rows * length, t.hidden_size, t.intermediate_size)
  return t.layers * layer + dense(rows * length, t.hidden_size, t.vocab_size)


def forward_flops(m: ml_collections.ConfigDict, shapes: Mapping[str, Sequence[int]]
                  ) -> dict[str, float]:
  """Forward FLOPs: {"patch_embed", "vision", "abstractor", "llm"}."""
  rows, length = tuple(shapes["input_ids"])
  slots = tuple(shapes["images"])[1] if "images" in shapes else 0
  images = rows * slots
  embed, blocks = vision_flops(m, images) if images else (0.0, 0.0)
  spliced = length + slots * (owl2_config.tokens_per_image(m) - 1)
  return {"patch_embed": embed, "vision": blocks,
          "abstractor": abstractor_flops(m, images) if images else 0.0,
          "llm": llm_flops(m, rows, spliced)}


def vision_frozen(config: ml_collections.ConfigDict) -> bool:
  """Whether the optimizer freezes the ViT (a representative parameter path matched
  against `config.optimizer.frozen`)."""
  patterns = tuple(config.optimizer.frozen) if "optimizer" in config else ()
  return any(re.search(p, "vision/blocks/attn/query/kernel") for p in patterns)


def train_step_flops(config: ml_collections.ConfigDict,
                     shapes: Mapping[str, Sequence[int]]) -> float:
  """FLOPs of one optimizer step over the global batch `shapes` (see the module doc)."""
  f = forward_flops(config.model, shapes)
  if vision_frozen(config):
    vision = f["patch_embed"] + f["vision"]
  else:
    vision = 2.0 * f["patch_embed"] + 3.0 * f["vision"]
  return vision + 3.0 * (f["abstractor"] + f["llm"])
