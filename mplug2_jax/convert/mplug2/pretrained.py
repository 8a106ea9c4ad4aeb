"""Initialisation for pretraining from CLIP and BERT checkpoints (spec sections 2.1, 13.1).

As the official code: the video encoder starts from a CLIP ViT (OpenAI `visual.*` keys or
HF `CLIPVisionModel` keys; the 2-D patch kernel is inflated to 3-D at the temporal centre;
the LocalTemporal modules start fresh with zero up-projections, i.e. as identities); the
text encoder, the fusion layers and the decoder start from BERT (HF `BertModel`,
`BertForMaskedLM` or `BertForPreTraining` keys): text layer i <- BERT layer i, running
fusion layer j <- BERT layer (built - running + j) as `from_pretrained` fills all built
layers, decoder layer i <- BERT layer i, decoder LM head <- BERT's MLM head when present.

What BERT and CLIP do not have (universal cross-attention, latent queries, fusion and
decoder cross-attention, the temporal modules, heads) keeps the model's fresh init, which
follows the official/HF initialisers; each such group is reported, never silently.

Official quirk (spec 2.1, 15.1): the official model resets the visual positional embedding
to zeros at construction. `positional_embedding="zeros"` reproduces that; the default
"resized" keeps CLIP's table, bilinearly resized to the configured grid (the fix).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections
import numpy as np

from mplug2_jax.convert.mplug2 import official

# HF CLIP vision keys (after dropping a leading "vision_model.", which transformers 4
# writes and 5 does not for CLIPVisionModel) -> OpenAI keys.
HF_CLIP_RENAMES = (
    (r"^embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^embeddings\.patch_embedding\.weight$", "visual.conv1.weight"),
    (r"^embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^pre_layrnorm\.", "visual.ln_pre."),
    (r"^post_layernorm\.", "visual.ln_post."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"visual.transformer.resblocks.\1.attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"visual.transformer.resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"visual.transformer.resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"visual.transformer.resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"visual.transformer.resblocks.\1.mlp.c_proj."),
)


def clip_to_openai(state: Mapping) -> dict[str, np.ndarray]:
  """OpenAI-format `visual.*` tensors from an OpenAI CLIP or an HF CLIP(Vision)Model."""
  out = {k: np.asarray(state[k]) for k in state if k.startswith("visual.")}
  if out:
    return out
  qkv: dict[str, dict[str, np.ndarray]] = {}
  for key in state:
    short = key[len("vision_model."):] if key.startswith("vision_model.") else key
    match = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", short)
    if match:
      qkv.setdefault(f"{match.group(1)}.{match.group(3)}", {})[match.group(2)] = np.asarray(state[key])
      continue
    for pattern, repl in HF_CLIP_RENAMES:
      if re.search(pattern, short):
        out[re.sub(pattern, repl, short)] = np.asarray(state[key])
        break
  for layer_param, parts in qkv.items():
    layer, param = layer_param.split(".")
    name = "in_proj_weight" if param == "weight" else "in_proj_bias"
    out[f"visual.transformer.resblocks.{layer}.attn.{name}"] = np.concatenate(
        [parts["q"], parts["k"], parts["v"]])
  if not out:
    raise official.ConversionError("no CLIP vision keys found (expected OpenAI 'visual.*' "
                                   "or HF CLIPVisionModel keys)")
  return out


def clip_to_official(state: Mapping, m: ml_collections.ConfigDict,
                     positional_embedding: str = "resized") -> dict[str, np.ndarray]:
  visual = clip_to_openai(state)
  out = {}
  for key, value in visual.items():
    if key == "visual.conv1.weight" and value.ndim == 4:
      kt = 3 if m.vision.temporal_downsampling else 1
      inflated = np.zeros(value.shape[:2] + (kt,) + value.shape[2:], value.dtype)
      inflated[:, :, kt // 2] = value  # "centre" inflation
      value = inflated
    if key == "visual.positional_embedding":
      grid = m.image_size // m.vision.patch_size
      value = (np.zeros((1 + grid * grid, value.shape[1]), value.dtype)
               if positional_embedding == "zeros"
               else official.resize_positional_embedding(value, grid))
    out["visual_encoder." + key] = value
  return out


def bert_to_official(state: Mapping, m: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The official text-encoder / fusion / decoder keys that a BERT checkpoint fills."""
  def strip(key: str) -> str:
    return key[len("bert."):] if key.startswith("bert.") else key

  bert = {strip(k): k for k in state}
  t = m.text
  out: dict[str, np.ndarray] = {}

  def copy(src: str, dst: str):
    if src in bert:
      out[dst] = np.asarray(state[bert[src]])

  def layer(src_i: int, dst_prefix: str):
    prefix = f"encoder.layer.{src_i}."
    for short in bert:
      if short.startswith(prefix) and not short.startswith(prefix + "crossattention"):
        copy(short, dst_prefix + short[len(prefix):])

  for short in [k for k in bert if k.startswith("embeddings.")]:
    copy(short, "text_encoder." + short)
    copy(short, "text_decoder.bert." + short)
  for i in range(t.encoder_layers):
    layer(i, f"text_encoder.encoder.layer.{i}.")
  for i in range(t.fusion_layers_built):
    layer(i, f"fusion_encoder.encoder.layer.{i}.")
  for i in range(t.decoder_layers):
    layer(i, f"text_decoder.bert.encoder.layer.{i}.")
  for short in bert:
    if short.startswith("cls.predictions.") and "decoder" not in short:
      out["text_decoder." + short] = np.asarray(state[bert[short]])
  return out


def initialise(fresh: dict[str, np.ndarray], m: ml_collections.ConfigDict, *,
               clip: Mapping | None = None, bert: Mapping | None = None,
               positional_embedding: str = "resized"):
  """Fresh flat params (path -> array) with CLIP / BERT weights imported where they exist.

  Returns (params, report) with report = {"imported": [...], "fresh": [...]} listing
  official key groups by where their values came from.
  """
  if positional_embedding not in ("resized", "zeros"):
    raise ValueError(f"positional_embedding={positional_embedding!r}: 'resized' or 'zeros'")
  available: dict[str, np.ndarray] = {}
  if clip is not None:
    available.update(clip_to_official(clip, m, positional_embedding))
  if bert is not None:
    available.update(bert_to_official(bert, m))
  params = dict(fresh)
  report = {"imported": [], "fresh": []}
  for entry in official.entries(m):
    if all(k in available for k in entry.official):
      arrays = entry.to_flax([available[k] for k in entry.official])
      for path, value in zip(entry.flax, arrays):
        if tuple(value.shape) != tuple(fresh[path].shape):
          raise official.ConversionError(
              f"{entry.official[0]!r} -> {path!r}: pretrained shape {tuple(value.shape)} but "
              f"the model expects {tuple(fresh[path].shape)}")
        params[path] = value.astype(fresh[path].dtype)
      report["imported"].extend(entry.official)
    else:
      report["fresh"].extend(entry.flax)
  return params, report


def summarise(paths: list[str]) -> list[str]:
  """Group parameter paths for a readable report ('decoder/layers/cross_attn' ...)."""
  groups = []
  for path in paths:
    group = re.sub(r"/(kernel|bias|scale|embedding)$", "", path)
    group = re.sub(r"/(query|key|value|out|wi|wo|down|up)$", "", group)
    if group not in groups:
      groups.append(group)
  return groups
