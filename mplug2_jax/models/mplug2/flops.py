"""Analytic FLOPs of one train step, from the config and the batch shapes.

  train_step_flops(config, shapes) -> float      (whole global batch, one optimizer step)

Counted: every matrix multiplication (2 FLOPs per multiply-add) of the model as the task's
objective runs it (model.py, objectives.py), attention scores and values
included. Trainable forwards count 3x (forward, input gradient, weight gradient); the
patch embedding 2x (no gradient w.r.t. the pixels); the momentum model of ITC forward only
(no gradient). Not counted: element-wise work (norms, softmax, activations, the optimizer
update), which is a few percent for real model sizes; the test compares with XLA's cost
analysis (within 20 %; 3-5 % seen) on a small model where that share is still visible.
XLA's cost analysis counts the body of a while loop once, so for models whose layers are
scanned (`layers/stack.py`) it is not a substitute for this count.

Shapes: the batch dict's arrays (`video` (B, T, H, W, 3), `text_ids` (B, L),
`caption_ids`, `answer_ids` (B*K, La)); `config.model` gives the widths.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ml_collections

from mplug2_jax.models import vit


def dense(tokens: float, d_in: int, d_out: int) -> float:
  return 2.0 * tokens * d_in * d_out


def attention(batch: float, q_len: int, kv_len: int, width: int, kv_width: int | None = None
              ) -> float:
  """Projections (q, k, v, out) + scores + weighted values; heads x head_dim = width."""
  kv_width = width if kv_width is None else kv_width
  proj = dense(batch * q_len, width, width) * 2 + dense(batch * kv_len, kv_width, width) * 2
  return proj + 2 * (2.0 * batch * q_len * kv_len * width)


def bert_layer(batch: float, length: int, t, cross_len: int = 0) -> float:
  d = t.hidden_size
  out = attention(batch, length, length, d)
  if cross_len:
    out += attention(batch, length, cross_len, d)
  return out + 2 * dense(batch * length, d, t.intermediate_size)


def lm_head(tokens: float, t) -> float:
  return dense(tokens, t.hidden_size, t.hidden_size) + dense(tokens, t.hidden_size, t.vocab_size)


def vision_flops(m, batch: int, frames: int, image_size: int) -> tuple[float, float]:
  """(patch embedding, transformer blocks) forward FLOPs of the video encoder."""
  v = m.vision
  p, w = v.patch_size, v.width
  grid = image_size // p
  t_kernel = 3 if v.temporal_downsampling else 1
  t_out = (vit.num_tokens(v, image_size, frames) - 1) // (grid * grid)
  seqs = batch * t_out
  patches = seqs * grid * grid
  embed = dense(patches, t_kernel * p * p * 3, w)
  per_block = attention(seqs, 1 + grid * grid, 1 + grid * grid, w)
  per_block += 2 * dense(seqs * (1 + grid * grid), w, vit.mlp_width(v))
  if v.temporal_adapter:
    per_block += 2 * (dense(patches, w, w // 2) + dense(patches, w // 2, w))
  return embed, v.layers * per_block


def image_tokens(m, frames: int, image_size: int) -> int:
  return vit.num_tokens(m.vision, image_size, frames)


def embed_image_flops(m, batch: int, frames: int, image_size: int) -> tuple[float, float]:
  """(patch embedding, the rest) of `embed_image`: ViT, projection, universal layers."""
  t = m.text
  embed, blocks = vision_flops(m, batch, frames, image_size)
  n = image_tokens(m, frames, image_size)
  rest = blocks
  if m.vision.width != t.hidden_size:
    rest += dense(batch * n, m.vision.width, t.hidden_size)
  lat = t.num_latents
  rest += (t.universal_layers - 1) * bert_layer(batch, lat, t, cross_len=n)
  rest += bert_layer(batch, n, t, cross_len=lat)  # role swap: visual queries, latent keys
  return embed, rest


def text_flops(m, batch: int, length: int) -> float:
  return m.text.encoder_layers * bert_layer(batch, length, m.text)


def fusion_flops(m, batch: int, n_image: int, length: int) -> float:
  t = m.text
  running = min(t.fusion_layers, t.fusion_layers_built)
  out = 0.0
  for j in range(running):
    if j > 0 and j % t.fusion_stride == 0:
      out += bert_layer(batch, n_image + length, t)
    else:
      out += bert_layer(batch, length, t, cross_len=n_image)
  return out


def decoder_flops(m, rows: int, length: int, cross_len: int) -> float:
  t = m.text
  return t.decoder_layers * bert_layer(rows, length, t, cross_len) + lm_head(rows * length, t)


def _shape(shapes: Mapping[str, Sequence[int]], key: str):
  return tuple(shapes[key]) if key in shapes else None


def forward_flops(m: ml_collections.ConfigDict, shapes: Mapping[str, Sequence[int]],
                  queue_size: int = 0) -> tuple[float, float, float]:
  """(trainable forward, patch-embedding forward, no-gradient forward) FLOPs."""
  task = m.task
  video = _shape(shapes, "video")
  batch, frames, image_size = (video[0], video[1], video[2]) if video else (0, 0, 0)
  n = image_tokens(m, frames, image_size) if video else 0
  train, embed, frozen = 0.0, 0.0, 0.0
  if video is not None and task != "classification":
    embed, rest = embed_image_flops(m, batch, frames, image_size)
    train += rest
  if task == "classification":
    embed, blocks = vision_flops(m, batch, frames, image_size)
    train += blocks + dense(batch, m.vision.width, m.num_classes)
  elif task == "caption":
    rows, length = _shape(shapes, "caption_ids")
    train += decoder_flops(m, rows, length, n)
  elif task in ("videoqa", "grounding"):
    _, lq = _shape(shapes, "text_ids")
    rows, la = _shape(shapes, "answer_ids")
    train += text_flops(m, batch, lq) + fusion_flops(m, batch, n, lq)
    train += decoder_flops(m, rows, la, n + lq)
  elif task in ("retrieval", "pretrain"):
    b, lt = _shape(shapes, "text_ids")
    if video is None:  # text-only corpus: MLM on the text encoder
      return text_flops(m, b, lt) + lm_head(b * lt, m.text), 0.0, 0.0
    e, d = m.embed_dim, m.text.hidden_size
    itc_proj = dense(b, d, e) * 2
    sims = 2 * dense(b, e, b + queue_size)
    train += text_flops(m, b, lt) + itc_proj + sims
    m_embed, m_rest = embed_image_flops(m, b, frames, image_size)  # momentum model
    frozen += m_embed + m_rest + text_flops(m, b, lt) + itc_proj + sims
    train += fusion_flops(m, 3 * b, n, lt) + dense(3 * b, d, 2)  # ITM
    if task == "pretrain":
      train += text_flops(m, b, lt) + fusion_flops(m, b, n, lt) + lm_head(b * lt, m.text)
      train += decoder_flops(m, b, lt, n)
  return train, embed, frozen


def train_step_flops(config: ml_collections.ConfigDict,
                     shapes: Mapping[str, Sequence[int]]) -> float:
  """FLOPs of one optimizer step over the global batch `shapes` (see the module doc)."""
  queue = int(config.objective.queue_size) if "objective" in config else 0
  train, embed, frozen = forward_flops(config.model, shapes, queue)
  return 3.0 * train + 2.0 * embed + frozen
