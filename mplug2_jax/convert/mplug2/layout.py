"""The complete official mPLUG-2 state-dict layout (every key and shape) for a config.

The official task models build more than they run (spec sections 2.1, 3.3, 4, 12): the
CLIP text tower, `visual.proj`, all `num_hidden_layers` fusion layers, fusion embeddings,
the unused vision FFNs of universal layers, decoder latents, position-id buffers and, for
VideoQA with `distill`, momentum copies. Export must write all of them so that the official
classes load the file with `load_state_dict(strict=True)`; this module lists them, in the
official state-dict order, from `config.model` alone.
"""

from __future__ import annotations

import ml_collections

Layout = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype)

F32, I64 = "float32", "int64"


def _linear(out: Layout, name: str, fan_out: int, fan_in: int):
  out[f"{name}.weight"] = ((fan_out, fan_in), F32)
  out[f"{name}.bias"] = ((fan_out,), F32)


def _norm(out: Layout, name: str, width: int):
  out[f"{name}.weight"] = ((width,), F32)
  out[f"{name}.bias"] = ((width,), F32)


def _clip_resblock(out: Layout, name: str, width: int, temporal: bool):
  if temporal:
    for lt in ("lmhra1", "lmhra2"):
      half = width // 2
      _norm(out, f"{name}.{lt}.ln", width)
      out[f"{name}.{lt}.down_proj.weight"] = ((half, width, 1, 1, 1), F32)
      out[f"{name}.{lt}.down_proj.bias"] = ((half,), F32)
      out[f"{name}.{lt}.conv.weight"] = ((half, 1, 3, 1, 1), F32)
      out[f"{name}.{lt}.conv.bias"] = ((half,), F32)
      out[f"{name}.{lt}.up_proj.weight"] = ((width, half, 1, 1, 1), F32)
      out[f"{name}.{lt}.up_proj.bias"] = ((width,), F32)
  out[f"{name}.attn.in_proj_weight"] = ((3 * width, width), F32)
  out[f"{name}.attn.in_proj_bias"] = ((3 * width,), F32)
  _linear(out, f"{name}.attn.out_proj", width, width)
  _norm(out, f"{name}.ln_1", width)
  _linear(out, f"{name}.mlp.c_fc", 4 * width, width)
  _linear(out, f"{name}.mlp.c_proj", width, 4 * width)
  _norm(out, f"{name}.ln_2", width)


def _visual_encoder(out: Layout, m: ml_collections.ConfigDict, prefix: str):
  v, clip = m.vision, m.official
  grid = m.image_size // v.patch_size
  kt = 3 if v.temporal_downsampling else 1
  tw = clip.text_width
  out[f"{prefix}.positional_embedding"] = ((clip.context_length, tw), F32)
  out[f"{prefix}.text_projection"] = ((tw, clip.embed_dim), F32)
  out[f"{prefix}.logit_scale"] = ((), F32)
  vis = f"{prefix}.visual"
  out[f"{vis}.class_embedding"] = ((v.width,), F32)
  out[f"{vis}.positional_embedding"] = ((1 + grid * grid, v.width), F32)
  out[f"{vis}.proj"] = ((v.width, clip.embed_dim), F32)
  out[f"{vis}.conv1.weight"] = ((v.width, 3, kt, v.patch_size, v.patch_size), F32)
  _norm(out, f"{vis}.ln_pre", v.width)
  for i in range(v.layers):
    _clip_resblock(out, f"{vis}.transformer.resblocks.{i}", v.width, v.temporal_adapter)
  _norm(out, f"{vis}.ln_post", v.width)
  for i in range(clip.text_layers):
    _clip_resblock(out, f"{prefix}.transformer.resblocks.{i}", tw, temporal=False)
  out[f"{prefix}.token_embedding.weight"] = ((clip.vocab_size, tw), F32)
  _norm(out, f"{prefix}.ln_final", tw)


def _embeddings(out: Layout, prefix: str, t: ml_collections.ConfigDict):
  d = t.hidden_size
  out[f"{prefix}.position_ids"] = ((1, t.max_position_embeddings), I64)
  out[f"{prefix}.word_embeddings.weight"] = ((t.vocab_size, d), F32)
  out[f"{prefix}.position_embeddings.weight"] = ((t.max_position_embeddings, d), F32)
  out[f"{prefix}.token_type_embeddings.weight"] = ((t.type_vocab_size, d), F32)
  _norm(out, f"{prefix}.LayerNorm", d)


def _bert_layer(out: Layout, name: str, t: ml_collections.ConfigDict, *, cross: bool,
                latents: bool, vision_ffn: bool):
  d, ffn = t.hidden_size, t.intermediate_size
  if latents:
    out[f"{name}.latents"] = ((t.num_latents, d), F32)
  for block, present in (("attention", True), ("crossattention", cross)):
    if not present:
      continue
    for proj in ("query", "key", "value"):
      _linear(out, f"{name}.{block}.self.{proj}", d, d)
    _linear(out, f"{name}.{block}.output.dense", d, d)
    _norm(out, f"{name}.{block}.output.LayerNorm", d)
  _linear(out, f"{name}.intermediate.dense", ffn, d)
  _linear(out, f"{name}.output.dense", d, ffn)
  _norm(out, f"{name}.output.LayerNorm", d)
  if vision_ffn:
    _linear(out, f"{name}.intermediate_vision.dense", ffn, d)
    _linear(out, f"{name}.output_vision.dense", d, ffn)
    _norm(out, f"{name}.output_vision.LayerNorm", d)


def _bert_model(out: Layout, prefix: str, t: ml_collections.ConfigDict, layers: int, *,
                decoder: bool):
  """`modeling_mplug2.BertModel`: the last `universal_layers` layers are universal."""
  _embeddings(out, f"{prefix}.embeddings", t)
  first_universal = layers - t.universal_layers
  for i in range(layers):
    universal = i >= first_universal
    _bert_layer(out, f"{prefix}.encoder.layer.{i}", t, cross=decoder or universal,
                latents=i == first_universal, vision_ffn=universal)


def _fusion_model(out: Layout, prefix: str, t: ml_collections.ConfigDict):
  _embeddings(out, f"{prefix}.embeddings", t)
  for i in range(t.fusion_layers_built):
    _bert_layer(out, f"{prefix}.encoder.layer.{i}", t, cross=True, latents=False,
                vision_ffn=False)


def _decoder(out: Layout, prefix: str, t: ml_collections.ConfigDict):
  _bert_model(out, f"{prefix}.bert", t, t.decoder_layers, decoder=True)
  d = t.hidden_size
  out[f"{prefix}.cls.predictions.bias"] = ((t.vocab_size,), F32)
  _linear(out, f"{prefix}.cls.predictions.transform.dense", d, d)
  _norm(out, f"{prefix}.cls.predictions.transform.LayerNorm", d)
  out[f"{prefix}.cls.predictions.decoder.weight"] = ((t.vocab_size, d), F32)
  out[f"{prefix}.cls.predictions.decoder.bias"] = ((t.vocab_size,), F32)


def _task_model(out: Layout, m: ml_collections.ConfigDict, suffix: str, fusion: bool = True):
  t = m.text
  _norm(out, f"visn_emb_norm{suffix}", t.hidden_size)
  if m.vision.width != t.hidden_size:
    _linear(out, f"visn_fc{suffix}", t.hidden_size, m.vision.width)
    _norm(out, f"visn_layer_norm{suffix}", t.hidden_size)
  _visual_encoder(out, m, f"visual_encoder{suffix}")
  _bert_model(out, f"text_encoder{suffix}", t, t.encoder_layers, decoder=False)
  if fusion:
    _fusion_model(out, f"fusion_encoder{suffix}", t)
  _decoder(out, f"text_decoder{suffix}", t)


def official_layout(m: ml_collections.ConfigDict) -> Layout:
  """Every state-dict entry of the official task model for `config.model` (caption or
  videoqa; VideoQA adds `*_m` momentum copies when `official.distill`)."""
  if m.task not in ("caption", "videoqa"):
    raise ValueError(f"the official code releases caption and videoqa models, not {m.task!r}")
  out: Layout = {}
  # Both task classes build the fusion model; the caption task never runs it.
  _task_model(out, m, "", fusion=True)
  if m.task == "videoqa" and m.official.distill:
    momentum: Layout = {}
    _task_model(momentum, m, "_m", fusion=True)
    # Official order: the momentum towers first, the momentum norms / projection last.
    out.update({k: v for k, v in momentum.items() if not k.startswith("visn_")})
    out.update({k: v for k, v in momentum.items() if k.startswith("visn_")})
  return out
