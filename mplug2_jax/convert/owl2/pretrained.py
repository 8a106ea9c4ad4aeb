"""Initialisation for pre-training from LLaMA-2 (HF) and a CLIP ViT (HF vision tower).

The released checkpoint was fine-tuned from a pre-training run that is not public; a new
pre-training starts from LLaMA-2 and CLIP ViT-L/14 (owl2.md sections 10, 11.1):

  --llama  HF `LlamaForCausalLM` weights (`model.*`, `lm_head.weight`) -> the LLM. The
           text branch (`multiway.0`) gets LLaMA's K/V projections and norms; the image
           branch (`multiway.1`) starts as a **copy** of them. The official code does not
           say how the image branch and the abstractor were initialised for pre-training;
           a copy is the presumption of the spec (section 10, "unverified"), under which a
           text-only sequence is exactly LLaMA-2 and image tokens start from the same
           function. Shared Q/O/MLP, embeddings, final norm and head are LLaMA's.
           `rotary_emb.inv_freq` buffers are checked when present.
  --vit    HF `CLIPVisionModel` / `CLIPModel` weights (`vision_model.*`; the text tower
           and projections are ignored) -> the ViT. q/k/v are separate there; the
           positional table is resized bilinearly to the configured grid (CLIP ViT-L/14
           has 16x16 at 224 px, Owl2 32x32 at 448 px). CLIP's LayerNorm eps is 1e-5 and
           Owl2's ViT runs with its config's 1e-6 (the official model does the same).

The abstractor (queries, `vit_eos`, layers, `visual_fc`) keeps its fresh init (official
initialisers, section 10); every group that is not imported is reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections
import numpy as np

from mplug2_jax.convert import positions
from mplug2_jax.convert.owl2.official import ConversionError
from mplug2_jax.layers import embeddings


def _get(state: Mapping, key: str, shape: tuple) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"missing key {key!r} in the pretrained checkpoint")
  value = np.asarray(state[key])
  if tuple(value.shape) != tuple(shape):
    raise ConversionError(f"pretrained key {key!r} has shape {tuple(value.shape)}, the config "
                          f"needs {tuple(shape)}")
  return value


def llama_params(state: Mapping, m: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """HF LLaMA state dict -> our `llm/...` leaves (image branch = copy of the text one)."""
  t = m.llm
  d, hd = t.hidden_size, t.hidden_size // t.num_heads
  n, kv = t.layers, t.num_kv_heads * hd
  used = set()

  def get(key, shape):
    used.add(key)
    return _get(state, key, shape)

  def layers(fmt, shape, fn):
    return np.stack([fn(get(fmt.format(i=i), shape)) for i in range(n)])

  copies = lambda x: np.stack([x] * t.num_modalities)
  p = "model.layers.{i}."
  out = {
      "llm/embed/embedding": get("model.embed_tokens.weight", (t.vocab_size, d)),
      "llm/layers/attn/query/kernel": layers(p + "self_attn.q_proj.weight", (t.num_heads * hd, d),
                                             lambda w: w.T.reshape(d, t.num_heads, hd)),
      "llm/layers/attn/key/kernel": layers(p + "self_attn.k_proj.weight", (kv, d),
                                           lambda w: copies(w.T.reshape(d, t.num_kv_heads, hd))),
      "llm/layers/attn/value/kernel": layers(p + "self_attn.v_proj.weight", (kv, d),
                                             lambda w: copies(w.T.reshape(d, t.num_kv_heads, hd))),
      "llm/layers/attn/out/kernel": layers(p + "self_attn.o_proj.weight", (d, t.num_heads * hd),
                                           lambda w: w.T.reshape(t.num_heads, hd, d)),
      "llm/layers/mlp/gate/kernel": layers(p + "mlp.gate_proj.weight",
                                           (t.intermediate_size, d), lambda w: w.T),
      "llm/layers/mlp/wi/kernel": layers(p + "mlp.up_proj.weight", (t.intermediate_size, d),
                                         lambda w: w.T),
      "llm/layers/mlp/wo/kernel": layers(p + "mlp.down_proj.weight", (d, t.intermediate_size),
                                         lambda w: w.T),
      "llm/layers/input_norm/scale": layers(p + "input_layernorm.weight", (d,), copies),
      "llm/layers/post_norm/scale": layers(p + "post_attention_layernorm.weight", (d,), copies),
      "llm/norm/scale": get("model.norm.weight", (d,)),
      "llm/lm_head/kernel": get("lm_head.weight", (t.vocab_size, d)).T,
  }
  inv_freq = embeddings.rope_inv_freq(hd, t.rope_theta)
  for key in state:
    if key in used:
      continue
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", key):
      if not np.allclose(np.asarray(state[key], np.float32), inv_freq, rtol=1e-6, atol=1e-7):
        raise ConversionError(f"{key!r} differs from rope_theta={t.rope_theta}, head size {hd}")
      continue
    raise ConversionError(f"unexpected LLaMA key {key!r}: not a LlamaForCausalLM of this config")
  return out


HF_CLIP_TEXT_PARTS = re.compile(r"^(text_model|text_projection|visual_projection|logit_scale)")


def vit_params(state: Mapping, m: ml_collections.ConfigDict) -> tuple[dict[str, np.ndarray], list]:
  """HF CLIP vision weights -> our `vision/...` leaves; returns (leaves, notes)."""
  v = m.vision
  w, heads, p = v.width, v.width // v.head_dim, v.patch_size
  strip = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
  notes: list[str] = []
  used = set()

  def get(key, shape):
    used.add(strip + key)
    return _get(state, strip + key, shape)

  n = v.layers
  lay = lambda fmt, shape, fn: np.stack([fn(get(fmt.format(i=i), shape)) for i in range(n)])
  heads_in = lambda x: x.T.reshape(w, heads, -1)
  heads_bias = lambda x: x.reshape(heads, -1)
  e = "encoder.layers.{i}."
  table = np.asarray(state[strip + "embeddings.position_embedding.weight"]) if (
      strip + "embeddings.position_embedding.weight") in state else None
  if table is None:
    raise ConversionError("missing key 'vision_model.embeddings.position_embedding.weight'")
  used.add(strip + "embeddings.position_embedding.weight")
  grid = m.image_size // p
  if table.shape[0] != 1 + grid * grid:
    notes.append(f"CLIP positional table {table.shape[0]} rows resized to grid {grid}")
    table = positions.resize_positional_embedding(table, grid)
  out = {
      "vision/class_embedding": get("embeddings.class_embedding", (w,)),
      "vision/positional_embedding": table,
      "vision/patch_embed/kernel": get("embeddings.patch_embedding.weight",
                                       (w, 3, p, p)).transpose(2, 3, 1, 0)[None],
      "vision/ln_pre/scale": get("pre_layrnorm.weight", (w,)),
      "vision/ln_pre/bias": get("pre_layrnorm.bias", (w,)),
      "vision/ln_post/scale": get("post_layernorm.weight", (w,)),
      "vision/ln_post/bias": get("post_layernorm.bias", (w,)),
  }
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    out[f"vision/blocks/attn/{ours}/kernel"] = lay(e + f"self_attn.{theirs}.weight", (w, w), heads_in)
    out[f"vision/blocks/attn/{ours}/bias"] = lay(e + f"self_attn.{theirs}.bias", (w,), heads_bias)
  out["vision/blocks/attn/out/kernel"] = lay(e + "self_attn.out_proj.weight", (w, w),
                                             lambda x: x.T.reshape(heads, -1, w))
  out["vision/blocks/attn/out/bias"] = lay(e + "self_attn.out_proj.bias", (w,), lambda x: x)
  for ours, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
    out[f"vision/blocks/{ours}/scale"] = lay(e + f"{theirs}.weight", (w,), lambda x: x)
    out[f"vision/blocks/{ours}/bias"] = lay(e + f"{theirs}.bias", (w,), lambda x: x)
  out["vision/blocks/mlp/wi/kernel"] = lay(e + "mlp.fc1.weight", (v.mlp_dim, w), lambda x: x.T)
  out["vision/blocks/mlp/wi/bias"] = lay(e + "mlp.fc1.bias", (v.mlp_dim,), lambda x: x)
  out["vision/blocks/mlp/wo/kernel"] = lay(e + "mlp.fc2.weight", (w, v.mlp_dim), lambda x: x.T)
  out["vision/blocks/mlp/wo/bias"] = lay(e + "mlp.fc2.bias", (w,), lambda x: x)
  ignored = 0
  for key in state:
    if key in used or key.endswith("position_ids"):
      continue
    if HF_CLIP_TEXT_PARTS.match(key):
      ignored += 1
      continue
    if re.match(rf"^{re.escape(strip)}encoder\.layers\.(\d+)\.", key) and int(
        re.match(rf"^{re.escape(strip)}encoder\.layers\.(\d+)\.", key).group(1)) >= n:
      raise ConversionError(f"CLIP key {key!r}: the checkpoint has more than the configured "
                            f"{n} layers")
    raise ConversionError(f"unexpected CLIP key {key!r}")
  if ignored:
    notes.append(f"ignored {ignored} CLIP text-tower / projection tensors")
  return out, notes


def initialise(fresh: dict[str, np.ndarray], m: ml_collections.ConfigDict, *,
               llama: Mapping | None = None, vit: Mapping | None = None
               ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Fresh parameters with the given pretrained towers imported; (params, notes)."""
  params = dict(fresh)
  notes: list[str] = []
  imported: dict[str, np.ndarray] = {}
  if llama is not None:
    imported.update(llama_params(llama, m))
    notes.append("LLM from LLaMA-2; image branch (multiway.1) = copy of the text branch "
                 "(presumed, not stated by the official code)")
  if vit is not None:
    leaves, vit_notes = vit_params(vit, m)
    imported.update(leaves)
    notes += ["ViT from CLIP"] + vit_notes
  for path, value in imported.items():
    if path not in params:
      raise ConversionError(f"{path!r} is not a parameter of this model")
    if tuple(value.shape) != tuple(params[path].shape):
      raise ConversionError(f"{path!r}: pretrained shape {tuple(value.shape)}, model "
                            f"{tuple(params[path].shape)}")
    params[path] = np.asarray(value).astype(params[path].dtype)
  fresh_groups = sorted({"/".join(p.split("/")[:2]) for p in params if p not in imported})
  notes.append(f"imported {len(imported)} tensors; fresh init: {', '.join(fresh_groups)}")
  return params, notes
