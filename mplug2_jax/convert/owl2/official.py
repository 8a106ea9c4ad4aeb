"""The official mPLUG-Owl2 HF layout <-> our Flax parameter tree.

`layout(m)` is the complete official state dict of a config (every key of
`owl2_keys.tsv` for the 7B: 894 entries, 850 parameters and 44 persistent buffers, in the
official order). `entries(m)` maps every parameter key to Flax leaves, both ways; the
buffers (`rotary_emb.inv_freq`, the abstractor's `q_pos_embed` / `k_pos_embed`) are not
parameters: on import they are regenerated and compared when present (never required),
on export they are written regenerated (or copied from a reference checkpoint).

Layout changes (PyTorch -> Flax):
  Linear weight (out, in)                    -> kernel (in, out)
  q / k / v weight (heads*hd, in)            -> kernel (in, heads, hd); bias (heads, hd)
  output weight (D, heads*hd)                -> kernel (heads, hd, D)
  ViT query_key_value (3D, D), per-head      -> query / key / value kernels: the rows are
      Megatron layout (heads, 3, hd)            (heads, [q|k|v], hd), not [q;k;v] blocks
  *.multiway.{0,1}.weight (text, image)      -> one leaf with a leading modality axis (2, ...)
  patch_embed (D, 3, p, p)                   -> (1, p, p, 3, D)
  cls_token (1, 1, D), position_embedding    -> (D,), (T, D); query_embeds (1, Q, D) ->
      (1, T, D), vit_eos (1, 1, D)              (Q, D), vit_eos (D,)
  LayerNorm / RMSNorm weight, bias           -> scale, bias
  layer i of a stack                         -> index i of a leaf with a leading layers axis

Import preallocates each stacked leaf and fills it layer by layer from a lazily read
checkpoint, so converting holds one copy of the parameters plus one tensor in flight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Callable, Iterator

import ml_collections
import numpy as np

from mplug2_jax.layers import embeddings
from mplug2_jax.models.owl2 import config as owl2_config

Arrays = list[np.ndarray]


class ConversionError(ValueError):
  pass


@dataclasses.dataclass
class Entry:
  """Official keys <-> Flax leaves. With `layers` > 0 the keys contain "{i}" and every
  leaf has a leading layers axis; `to_flax` / `to_official` convert one layer."""
  official: list[str]
  flax: list[str]
  to_flax: Callable[[Arrays], Arrays]
  to_official: Callable[[Arrays], Arrays]
  layers: int = 0

  def keys(self, i: int | None = None) -> list[str]:
    return [k.format(i=i) for k in self.official] if self.layers else list(self.official)


def _same(official: str, flax: str, layers: int = 0) -> Entry:
  return Entry([official], [flax], lambda a: [a[0]], lambda a: [a[0]], layers)


def _reshaped(official: str, flax: str, shape: tuple, official_shape: tuple) -> Entry:
  return Entry([official], [flax], lambda a: [a[0].reshape(shape)],
               lambda a: [a[0].reshape(official_shape)])


def _linear(official: str, flax: str, bias: bool = True, layers: int = 0) -> list[Entry]:
  out = [Entry([f"{official}.weight"], [f"{flax}/kernel"], lambda a: [a[0].T],
               lambda a: [a[0].T], layers)]
  if bias:
    out.append(_same(f"{official}.bias", f"{flax}/bias", layers))
  return out


def _norm(official: str, flax: str, bias: bool = True, layers: int = 0) -> list[Entry]:
  out = [_same(f"{official}.weight", f"{flax}/scale", layers)]
  if bias:
    out.append(_same(f"{official}.bias", f"{flax}/bias", layers))
  return out


def _heads_in(official: str, flax: str, heads: int, bias: bool, layers: int) -> list[Entry]:
  """(heads*hd, D) -> (D, heads, hd); bias (heads*hd,) -> (heads, hd)."""
  out = [Entry([f"{official}.weight"], [f"{flax}/kernel"],
               lambda a: [a[0].T.reshape(a[0].shape[1], heads, -1)],
               lambda a: [a[0].reshape(a[0].shape[0], -1).T], layers)]
  if bias:
    out.append(Entry([f"{official}.bias"], [f"{flax}/bias"], lambda a: [a[0].reshape(heads, -1)],
                     lambda a: [a[0].reshape(-1)], layers))
  return out


def _heads_out(official: str, flax: str, heads: int, bias: bool, layers: int) -> list[Entry]:
  """(D, heads*hd) -> (heads, hd, D)."""
  out = [Entry([f"{official}.weight"], [f"{flax}/kernel"],
               lambda a: [a[0].T.reshape(heads, -1, a[0].shape[0])],
               lambda a: [a[0].reshape(-1, a[0].shape[-1]).T], layers)]
  if bias:
    out.append(_same(f"{official}.bias", f"{flax}/bias", layers))
  return out


def _multiway(official: str, flax: str, copies: int, fwd, inv, layers: int) -> Entry:
  """`official` with "{m}" for the copy -> one leaf with a leading modality axis."""
  return Entry([official.replace("{m}", str(m)) for m in range(copies)], [flax],
               lambda a: [np.stack([fwd(x) for x in a])],
               lambda a: [inv(x) for x in a[0]], layers)


def _fused_qkv(official: str, flax: str, heads: int, layers: int) -> Entry:
  """The ViT's per-head fused projection (owl2.md §2): weight rows (heads, 3, hd)."""
  names = [f"{flax}/{n}/{p}" for n in ("query", "key", "value") for p in ("kernel", "bias")]

  def fwd(a):
    w, b = a
    width = w.shape[1]
    w = w.reshape(heads, 3, -1, width)
    b = b.reshape(heads, 3, -1)
    out = []
    for j in range(3):
      out += [w[:, j].transpose(2, 0, 1), b[:, j]]
    return out

  def inv(a):
    kernels, biases = a[0::2], a[1::2]                        # (D, heads, hd), (heads, hd)
    w = np.stack([k.transpose(1, 2, 0) for k in kernels], axis=1)  # (heads, 3, hd, D)
    b = np.stack(biases, axis=1)                              # (heads, 3, hd)
    return [w.reshape(-1, w.shape[-1]), b.reshape(-1)]

  return Entry([f"{official}.weight", f"{official}.bias"], names, fwd, inv, layers)


# ---- the table ---------------------------------------------------------------------------


def entries(m: ml_collections.ConfigDict) -> list[Entry]:
  """Every official parameter key of the config, mapped to its Flax leaves."""
  v, a, t = m.vision, m.abstractor, m.llm
  out: list[Entry] = [_same("model.embed_tokens.weight", "llm/embed/embedding")]
  n = t.layers
  pre = "model.layers.{i}."
  out += _heads_in(pre + "self_attn.q_proj", "llm/layers/attn/query", t.num_heads, False, n)
  for name, leaf in (("k_proj", "key"), ("v_proj", "value")):
    out.append(_multiway(
        pre + f"self_attn.{name}.multiway.{{m}}.weight", f"llm/layers/attn/{leaf}/kernel",
        t.num_modalities, lambda w: w.T.reshape(w.shape[1], t.num_kv_heads, -1),
        lambda k: k.reshape(k.shape[0], -1).T, n))
  out += _heads_out(pre + "self_attn.o_proj", "llm/layers/attn/out", t.num_heads, False, n)
  out += (_linear(pre + "mlp.gate_proj", "llm/layers/mlp/gate", False, n)
          + _linear(pre + "mlp.up_proj", "llm/layers/mlp/wi", False, n)
          + _linear(pre + "mlp.down_proj", "llm/layers/mlp/wo", False, n))
  for name, leaf in (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_norm")):
    out.append(_multiway(pre + f"{name}.multiway.{{m}}.weight", f"llm/layers/{leaf}/scale",
                         t.num_modalities, lambda w: w, lambda w: w, n))
  out += _norm("model.norm", "llm/norm", bias=False)

  ve = "model.vision_model."
  tokens = owl2_config.vision_tokens(m)
  out += [_reshaped(ve + "embeddings.cls_token", "vision/class_embedding", (v.width,),
                    (1, 1, v.width)),
          _reshaped(ve + "embeddings.position_embedding", "vision/positional_embedding",
                    (tokens, v.width), (1, tokens, v.width)),
          Entry([ve + "embeddings.patch_embed.weight"], ["vision/patch_embed/kernel"],
                lambda x: [x[0].transpose(2, 3, 1, 0)[None]],
                lambda x: [x[0][0].transpose(3, 2, 0, 1)]),
          *_norm(ve + "embeddings.pre_layernorm", "vision/ln_pre")]
  nv, vheads = v.layers, v.width // v.head_dim
  vl = ve + "encoder.layers.{i}."
  out.append(_fused_qkv(vl + "self_attn.query_key_value", "vision/blocks/attn", vheads, nv))
  out += _heads_out(vl + "self_attn.dense", "vision/blocks/attn/out", vheads, True, nv)
  out += (_norm(vl + "input_layernorm", "vision/blocks/attn_norm", layers=nv)
          + _linear(vl + "mlp.fc1", "vision/blocks/mlp/wi", layers=nv)
          + _linear(vl + "mlp.fc2", "vision/blocks/mlp/wo", layers=nv)
          + _norm(vl + "post_attention_layernorm", "vision/blocks/mlp_norm", layers=nv))
  out += _norm(ve + "post_layernorm", "vision/ln_post")

  va = "model.visual_abstractor."
  out += [_reshaped(va + "query_embeds", "abstractor/query_embeds",
                    (a.num_queries, a.hidden_size), (1, a.num_queries, a.hidden_size)),
          _reshaped(va + "vit_eos", "abstractor/vit_eos", (t.hidden_size,),
                    (1, 1, t.hidden_size))]
  na = a.layers
  al = va + "encoder.layers.{i}.crossattention."
  for name in ("query", "key", "value"):
    out += _heads_in(al + f"attention.{name}", f"abstractor/layers/attn/{name}", a.num_heads,
                     True, na)
  out += _heads_out(al + "output.out_proj", "abstractor/layers/attn/out", a.num_heads, True, na)
  out += (_norm(al + "output.norm2", "abstractor/layers/norm_out", layers=na)
          + _linear(al + "output.mlp.w1", "abstractor/layers/mlp/gate", layers=na)
          + _linear(al + "output.mlp.w2", "abstractor/layers/mlp/wo", layers=na)
          + _linear(al + "output.mlp.w3", "abstractor/layers/mlp/wi", layers=na)
          + _norm(al + "output.mlp.ffn_ln", "abstractor/layers/mlp/inner_norm", layers=na)
          + _norm(al + "norm1", "abstractor/layers/norm_q", layers=na)
          + _norm(al + "normk", "abstractor/layers/norm_k", layers=na))
  out += _linear(va + "visual_fc", "abstractor/visual_fc")
  out += _linear("lm_head", "llm/lm_head", bias=False)
  return out


# ---- the complete official state dict: parameters and buffers ------------------------------


def buffers(m: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The official persistent buffers, regenerated (float32)."""
  t, a = m.llm, m.abstractor
  out = {}
  inv_freq = embeddings.rope_inv_freq(t.hidden_size // t.num_heads, t.rope_theta)
  for i in range(t.layers):
    out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
  from mplug2_jax.models.owl2 import abstractor

  pos_q, pos_k = abstractor.position_tables(a)
  for i in range(a.layers):
    pre = f"model.visual_abstractor.encoder.layers.{i}.crossattention.attention."
    out[pre + "q_pos_embed"], out[pre + "k_pos_embed"] = pos_q, pos_k
  return out


def layout(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Every official state-dict key of the config with its shape, in the official order
  (`owl2_keys.tsv`)."""
  v, a, t = m.vision, m.abstractor, m.llm
  d, hd = t.hidden_size, t.hidden_size // t.num_heads
  kv = t.num_kv_heads * hd
  out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t.vocab_size, d)}
  for i in range(t.layers):
    p = f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = (t.num_heads * hd, d)
    for name in ("k_proj", "v_proj"):
      for j in range(t.num_modalities):
        out[p + f"self_attn.{name}.multiway.{j}.weight"] = (kv, d)
    out[p + "self_attn.o_proj.weight"] = (d, t.num_heads * hd)
    out[p + "self_attn.rotary_emb.inv_freq"] = (hd // 2,)
    out[p + "mlp.gate_proj.weight"] = (t.intermediate_size, d)
    out[p + "mlp.up_proj.weight"] = (t.intermediate_size, d)
    out[p + "mlp.down_proj.weight"] = (d, t.intermediate_size)
    for name in ("input_layernorm", "post_attention_layernorm"):
      for j in range(t.num_modalities):
        out[p + f"{name}.multiway.{j}.weight"] = (d,)
  out["model.norm.weight"] = (d,)
  ve, w = "model.vision_model.", v.width
  tokens = owl2_config.vision_tokens(m)
  out[ve + "embeddings.cls_token"] = (1, 1, w)
  out[ve + "embeddings.position_embedding"] = (1, tokens, w)
  out[ve + "embeddings.patch_embed.weight"] = (w, 3, v.patch_size, v.patch_size)
  out[ve + "embeddings.pre_layernorm.weight"] = (w,)
  out[ve + "embeddings.pre_layernorm.bias"] = (w,)
  for i in range(v.layers):
    p = f"{ve}encoder.layers.{i}."
    out[p + "self_attn.query_key_value.weight"] = (3 * w, w)
    out[p + "self_attn.query_key_value.bias"] = (3 * w,)
    out[p + "self_attn.dense.weight"] = (w, w)
    out[p + "self_attn.dense.bias"] = (w,)
    out[p + "input_layernorm.weight"] = (w,)
    out[p + "input_layernorm.bias"] = (w,)
    out[p + "mlp.fc1.weight"] = (v.mlp_dim, w)
    out[p + "mlp.fc1.bias"] = (v.mlp_dim,)
    out[p + "mlp.fc2.weight"] = (w, v.mlp_dim)
    out[p + "mlp.fc2.bias"] = (w,)
    out[p + "post_attention_layernorm.weight"] = (w,)
    out[p + "post_attention_layernorm.bias"] = (w,)
  out[ve + "post_layernorm.weight"] = (w,)
  out[ve + "post_layernorm.bias"] = (w,)
  va, da, q = "model.visual_abstractor.", a.hidden_size, a.num_queries
  out[va + "query_embeds"] = (1, q, da)
  out[va + "vit_eos"] = (1, 1, d)
  for i in range(a.layers):
    p = f"{va}encoder.layers.{i}.crossattention."
    out[p + "attention.q_pos_embed"] = (q, da)
    out[p + "attention.k_pos_embed"] = (tokens, da)
    for name in ("query", "key", "value"):
      out[p + f"attention.{name}.weight"] = (da, da)
      out[p + f"attention.{name}.bias"] = (da,)
    out[p + "output.out_proj.weight"] = (da, da)
    out[p + "output.out_proj.bias"] = (da,)
    out[p + "output.norm2.weight"] = (da,)
    out[p + "output.norm2.bias"] = (da,)
    for name, shape in (("w1", (a.intermediate_size, da)), ("w2", (da, a.intermediate_size)),
                        ("w3", (a.intermediate_size, da))):
      out[p + f"output.mlp.{name}.weight"] = shape
      out[p + f"output.mlp.{name}.bias"] = (shape[0],)
    out[p + "output.mlp.ffn_ln.weight"] = (a.intermediate_size,)
    out[p + "output.mlp.ffn_ln.bias"] = (a.intermediate_size,)
    for name in ("norm1", "normk"):
      out[p + f"{name}.weight"] = (da,)
      out[p + f"{name}.bias"] = (da,)
  out[va + "visual_fc.weight"] = (d, da)
  out[va + "visual_fc.bias"] = (d,)
  out["lm_head.weight"] = (t.vocab_size, d)
  return out


# ---- import ----------------------------------------------------------------------------------

# Buffers regenerated here and in torch may differ in the last bit (torch's float32 pow for
# inv_freq, e.g. head size 128: 3e-8); a stored buffer must agree to this relative tolerance.
BUFFER_RTOL = 1e-6


def check_buffers(state: Mapping, m: ml_collections.ConfigDict) -> int:
  """Compares every buffer present in `state` with ours; returns how many were checked."""
  checked = 0
  for key, ours in buffers(m).items():
    if key not in state:
      continue
    got = np.asarray(state[key], np.float32)
    if got.shape != ours.shape:
      raise ConversionError(f"buffer {key!r} has shape {got.shape}, the config implies "
                            f"{ours.shape}")
    if not np.allclose(got, ours, rtol=BUFFER_RTOL, atol=1e-7):
      raise ConversionError(
          f"buffer {key!r} differs from the regenerated table (max abs diff "
          f"{float(np.max(np.abs(got - ours))):.3g}): a different rope_theta, head size, "
          f"grid or query count than config.model")
    checked += 1
  return checked


def to_flax(state: Mapping, m: ml_collections.ConfigDict,
            expected: Mapping[str, tuple] | None = None, dtype=None) -> dict[str, np.ndarray]:
  """Official state dict (any Mapping, read lazily key by key) -> flat {flax path: array};
  strict: an unknown key, a missing parameter, a shape that disagrees with the config or
  the model, or a buffer that differs is an error naming the key. `dtype` casts (default:
  keep the checkpoint's)."""
  official = layout(m)
  shape_of = getattr(state, "shape", None)
  for key in state:
    if key not in official:
      shape = tuple(shape_of(key)) if shape_of else tuple(np.shape(state[key]))
      raise ConversionError(f"unexpected official key {key!r} {shape}: not in the mPLUG-Owl2 "
                            f"layout of this config (mis-sized config, or another model)")
  check_buffers(state, m)
  flat: dict[str, np.ndarray] = {}

  def read(key):
    if key not in state:
      raise ConversionError(f"missing official key {key!r} {official[key]}")
    value = np.asarray(state[key])
    if tuple(value.shape) != official[key]:
      raise ConversionError(f"official key {key!r} has shape {tuple(value.shape)} but "
                            f"config.model implies {official[key]}")
    return value if dtype is None else value.astype(dtype, copy=False)

  def store(path, value, layer=None, layers=0):
    if layer is None:
      flat[path] = np.ascontiguousarray(value)
      return
    if layer == 0:
      flat[path] = np.empty((layers,) + value.shape, value.dtype)
    flat[path][layer] = value

  for e in entries(m):
    for i in range(e.layers) if e.layers else [None]:
      keys = e.keys(i)
      arrays = e.to_flax([read(k) for k in keys])
      for path, value in zip(e.flax, arrays):
        store(path, value, i, e.layers)
  if expected is not None:
    for path, value in flat.items():
      if path not in expected:
        raise ConversionError(f"{path!r} has no place in the model (config mismatch)")
      if tuple(value.shape) != tuple(expected[path]):
        raise ConversionError(f"{path!r}: converted shape {tuple(value.shape)} but the model "
                              f"expects {tuple(expected[path])}")
    unfilled = sorted(set(expected) - set(flat))
    if unfilled:
      raise ConversionError(f"model parameter {unfilled[0]!r} has no official key "
                            f"({len(unfilled)} unfilled)")
  return flat


# ---- export ----------------------------------------------------------------------------------


def official_tensors(flat: Mapping[str, np.ndarray], m: ml_collections.ConfigDict,
                     reference: Mapping | None = None, keys: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
  """(key, array) for every key of `layout(m)` (or of `keys`, in that order), computed one
  entry-layer at a time (streaming export). Buffers are regenerated, or copied from
  `reference` when it has them."""
  index: dict[str, tuple[int, int | None, int]] = {}
  table = entries(m)
  for n, e in enumerate(table):
    for i in range(e.layers) if e.layers else [None]:
      for j, key in enumerate(e.keys(i)):
        index[key] = (n, i, j)
  regenerated = buffers(m)
  official = layout(m)
  pending: dict[tuple[int, int | None], list] = {}  # outputs and how many are still unread
  for key in official if keys is None else keys:
    shape = official[key]
    if key in regenerated:
      value = regenerated[key]
      if reference is not None and key in reference:
        value = np.asarray(reference[key])
      yield key, value
      continue
    n, i, j = index[key]
    if (n, i) not in pending:
      e = table[n]
      leaves = [np.asarray(flat[p]) if i is None else np.asarray(flat[p])[i] for p in e.flax]
      pending[(n, i)] = [e.to_official(leaves), len(e.official)]
    outputs = pending[(n, i)]
    value = outputs[0][j]
    outputs[1] -= 1
    if not outputs[1]:
      del pending[(n, i)]
    if tuple(value.shape) != shape:
      raise ConversionError(f"export of {key!r}: shape {tuple(value.shape)} but the layout "
                            f"has {shape}")
    yield key, np.ascontiguousarray(value)


def to_official(flat: Mapping[str, np.ndarray], m: ml_collections.ConfigDict,
                reference: Mapping | None = None) -> dict[str, np.ndarray]:
  """The whole official state dict in memory (small models; see `official_tensors`)."""
  return dict(official_tensors(flat, m, reference))


# ---- configs ---------------------------------------------------------------------------------


def model_config_from_official(config: Mapping) -> ml_collections.ConfigDict:
  """`config.model` from an official `config.json` (MPLUGOwl2Config field names)."""
  visual = config.get("visual_config", {}) or {}
  vm, va = visual.get("visual_model", {}) or {}, visual.get("visual_abstractor", {}) or {}
  m = owl2_config.model_config("7b")
  m.size = "7b"
  get = lambda section, key, default: section.get(key, default)
  width = get(vm, "hidden_size", m.vision.width)
  heads = get(vm, "num_attention_heads", width // m.vision.head_dim)
  if width % heads:
    raise ConversionError(f"visual_model.hidden_size={width} is not divisible by "
                          f"num_attention_heads={heads}")
  m.vision.update(width=width, layers=get(vm, "num_hidden_layers", m.vision.layers),
                  patch_size=get(vm, "patch_size", m.vision.patch_size),
                  mlp_dim=get(vm, "intermediate_size", m.vision.mlp_dim),
                  head_dim=width // heads, ln_eps=float(get(vm, "layer_norm_eps", m.vision.ln_eps)))
  m.image_size = get(vm, "image_size", m.image_size)
  for key in ("hidden_act",):
    if get(vm, key, "quick_gelu") != "quick_gelu":
      raise ConversionError(f"visual_model.{key}={vm[key]!r}: only quick_gelu is implemented")
  if not get(vm, "use_cls_token", True) or not get(vm, "use_post_layernorm", True):
    raise ConversionError("visual_model without cls token / post layernorm is not the "
                          "mPLUG-Owl2-LLaMA vision model")
  if get(va, "add_v2t_pos_emb", False):
    raise ConversionError("visual_abstractor.add_v2t_pos_emb=true crashes the official code "
                          "(owl2.md section 3) and is not implemented")
  m.abstractor.update(hidden_size=get(va, "hidden_size", m.abstractor.hidden_size),
                      num_heads=get(va, "num_attention_heads", m.abstractor.num_heads),
                      intermediate_size=get(va, "intermediate_size",
                                            m.abstractor.intermediate_size),
                      layers=get(va, "num_hidden_layers", m.abstractor.layers),
                      num_queries=get(va, "num_learnable_queries", m.abstractor.num_queries),
                      layer_norm_eps=float(get(va, "layer_norm_eps",
                                               m.abstractor.layer_norm_eps)),
                      grid_size=get(va, "grid_size", m.abstractor.grid_size))
  if get(va, "encoder_hidden_size", width) != width:
    raise ConversionError(f"visual_abstractor.encoder_hidden_size="
                          f"{va['encoder_hidden_size']} != visual_model.hidden_size={width}")
  heads = config.get("num_attention_heads", m.llm.num_heads)
  if config.get("rope_scaling"):
    raise ConversionError(f"rope_scaling={config['rope_scaling']!r} is not implemented")
  if config.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"hidden_act={config['hidden_act']!r}: LLaMA uses silu")
  if config.get("tie_word_embeddings", False):
    raise ConversionError("tie_word_embeddings=true: mPLUG-Owl2 has an untied lm_head")
  m.llm.update(vocab_size=config.get("vocab_size", m.llm.vocab_size),
               hidden_size=config.get("hidden_size", m.llm.hidden_size),
               intermediate_size=config.get("intermediate_size", m.llm.intermediate_size),
               layers=config.get("num_hidden_layers", m.llm.layers), num_heads=heads,
               num_kv_heads=config.get("num_key_value_heads", None) or heads,
               rms_norm_eps=float(config.get("rms_norm_eps", m.llm.rms_norm_eps)),
               rope_theta=float(config.get("rope_theta", m.llm.rope_theta)),
               max_position_embeddings=config.get("max_position_embeddings",
                                                  m.llm.max_position_embeddings),
               pad_token_id=_token(config, "pad_token_id", m.llm.pad_token_id),
               bos_token_id=_token(config, "bos_token_id", m.llm.bos_token_id),
               eos_token_id=_token(config, "eos_token_id", m.llm.eos_token_id))
  m.size = "7b" if _architecture(m) == _architecture(owl2_config.model_config("7b")) else "tiny"
  return m


def _token(config: Mapping, key: str, default: int) -> int:
  value = config.get(key, default)
  return default if value is None else int(value)


# Model-config keys that decide the architecture and its numbers (not the run settings).
ARCHITECTURE_KEYS = ("image_size", "vision", "abstractor", "llm")


def _architecture(m: ml_collections.ConfigDict) -> dict:
  return {k: (m[k].to_dict() if isinstance(m[k], ml_collections.ConfigDict) else m[k])
          for k in ARCHITECTURE_KEYS}


def architecture_mismatch(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict
                          ) -> str | None:
  """The first architecture key where two model configs differ, as 'key: a vs b'."""
  fa, fb = _flatten(_architecture(a)), _flatten(_architecture(b))
  for key in sorted(set(fa) | set(fb)):
    if key in ("vision.mlp_ratio",):
      continue
    if fa.get(key) != fb.get(key):
      return f"model.{key}: {fa.get(key)!r} vs {fb.get(key)!r}"
  return None


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def official_config(m: ml_collections.ConfigDict, dtype: str = "float32") -> dict:
  """The official `config.json` (MPLUGOwl2Config layout) of a model config."""
  v, a, t = m.vision, m.abstractor, m.llm
  return {
      "architectures": ["MPLUGOwl2LlamaForCausalLM"],
      "attention_bias": False,
      "bos_token_id": t.bos_token_id,
      "eos_token_id": t.eos_token_id,
      "hidden_act": "silu",
      "hidden_size": t.hidden_size,
      "initializer_range": 0.02,
      "intermediate_size": t.intermediate_size,
      "max_position_embeddings": t.max_position_embeddings,
      "model_type": "mplug_owl2",
      "num_attention_heads": t.num_heads,
      "num_hidden_layers": t.layers,
      "num_key_value_heads": t.num_kv_heads,
      "pad_token_id": t.pad_token_id,
      "pretraining_tp": 1,
      "rms_norm_eps": t.rms_norm_eps,
      "rope_scaling": None,
      "rope_theta": t.rope_theta,
      "tie_word_embeddings": False,
      "torch_dtype": dtype,
      "use_cache": True,
      "visual_config": {
          "visual_abstractor": {
              "add_v2t_pos_emb": False, "attention_probs_dropout_prob": 0.0,
              "encoder_hidden_size": v.width, "grid_size": a.grid_size,
              "hidden_size": a.hidden_size, "initializer_range": 0.02,
              "intermediate_size": a.intermediate_size, "layer_norm_eps": a.layer_norm_eps,
              "model_type": "mplug_owl_visual_abstract",
              "num_attention_heads": a.num_heads, "num_hidden_layers": a.layers,
              "num_learnable_queries": a.num_queries, "use_cls_token": True},
          "visual_model": {
              "attention_dropout": 0.0, "hidden_act": "quick_gelu",
              "hidden_size": v.width, "image_size": m.image_size,
              "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": v.mlp_dim, "layer_norm_eps": v.ln_eps,
              "model_type": "mplug_owl_vision_model",
              "num_attention_heads": v.width // v.head_dim, "num_channels": 3,
              "num_hidden_layers": v.layers, "patch_size": v.patch_size,
              "projection_dim": 768, "use_cls_token": True, "use_flash_attn": False,
              "use_post_layernorm": True},
      },
      "vocab_size": t.vocab_size,
  }
