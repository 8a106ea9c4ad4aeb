"""The official PyTorch mPLUG-2 layout <-> our Flax parameter tree.

One table (`entries`) lists, for a model config, every official state-dict key our model
uses, the Flax leaves it becomes and the (invertible) layout change. Every other official
key must match one of `UNUSED_RULES`, each with the reason the official model builds it
but never runs it (spec section 12, 15); anything else is an error naming the key.

Layout changes (PyTorch -> Flax):
  Linear weight (out, in)               -> kernel (in, out)
  q/k/v weight (heads*hd, in)           -> kernel (in, heads, hd); bias (heads, hd)
  attention output weight (D, heads*hd) -> kernel (heads, hd, D)
  CLIP in_proj_weight (3D, D)           -> query / key / value kernels
  Conv3d patch kernel (C, 3, kt, p, p)  -> (kt, p, p, 3, C)
  LocalTemporal 1x1x1 convs             -> Dense kernels; depthwise (C', 1, 3, 1, 1) -> (3, C')
  LayerNorm weight / bias               -> scale / bias
  layers i..j of a scanned stack        -> one leaf with a leading layers axis
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Callable, Sequence

import ml_collections
import numpy as np

from mplug2_jax.convert.positions import resize_positional_embedding  # noqa: F401 (re-export)
from mplug2_jax.layers import stack
from mplug2_jax.models.mplug2 import config as mplug2_config

Arrays = list[np.ndarray]


class ConversionError(ValueError):
  pass


@dataclasses.dataclass
class Entry:
  """Official keys <-> Flax leaves (paths as '/'-joined strings), with both directions."""
  official: list[str]
  flax: list[str]
  to_flax: Callable[[Arrays], Arrays]
  to_official: Callable[[Arrays], Arrays]


def _prefixed(entries: list[Entry], official: str, flax: str) -> list[Entry]:
  return [Entry([official + k for k in e.official], [flax + k for k in e.flax], e.to_flax,
                e.to_official) for e in entries]


def _same(official: str, flax: str) -> Entry:
  return Entry([official], [flax], lambda a: [a[0]], lambda a: [a[0]])


def _linear(official: str, flax: str, bias: bool = True) -> list[Entry]:
  out = [Entry([f"{official}.weight"], [f"{flax}/kernel"], lambda a: [a[0].T],
               lambda a: [a[0].T])]
  if bias:
    out.append(_same(f"{official}.bias", f"{flax}/bias"))
  return out


def _norm(official: str, flax: str) -> list[Entry]:
  return [_same(f"{official}.weight", f"{flax}/scale"), _same(f"{official}.bias", f"{flax}/bias")]


def _embed(official: str, flax: str) -> Entry:
  return _same(f"{official}.weight", f"{flax}/embedding")


def _head_proj(official: str, flax: str, heads: int) -> list[Entry]:
  def fwd(a):
    w, b = a
    return [w.T.reshape(w.shape[1], heads, -1), b.reshape(heads, -1)]

  def inv(a):
    k, b = a
    return [k.reshape(k.shape[0], -1).T, b.reshape(-1)]

  return [Entry([f"{official}.weight", f"{official}.bias"], [f"{flax}/kernel", f"{flax}/bias"],
                fwd, inv)]


def _head_out(official: str, flax: str, heads: int) -> list[Entry]:
  def fwd(a):
    w, b = a
    return [w.T.reshape(heads, -1, w.shape[0]), b]

  def inv(a):
    k, b = a
    return [k.reshape(-1, k.shape[-1]).T, b]

  return [Entry([f"{official}.weight", f"{official}.bias"], [f"{flax}/kernel", f"{flax}/bias"],
                fwd, inv)]


def _stack(per_layer: Sequence[list[Entry]]) -> list[Entry]:
  """Per-layer entry lists (same structure) -> entries of a scanned stack (axis 0)."""
  stacked = []
  for column in zip(*per_layer):
    first = column[0]
    n_off = len(first.official)

    def fwd(a, column=column, n_off=n_off):
      outs = [e.to_flax(a[i * n_off:(i + 1) * n_off]) for i, e in enumerate(column)]
      return [np.stack(leaf) for leaf in zip(*outs)]

    def inv(a, column=column):
      outs = [e.to_official([leaf[i] for leaf in a]) for i, e in enumerate(column)]
      return [x for o in outs for x in o]

    stacked.append(Entry([k for e in column for k in e.official], first.flax, fwd, inv))
  return stacked


# ---- towers ---------------------------------------------------------------------------


def _bert_layer(heads: int, cross: bool) -> list[Entry]:
  """One official BertLayer ('' prefix) -> our BertLayer ('' prefix)."""
  entries = (_head_proj("attention.self.query", "self_attn/query", heads)
             + _head_proj("attention.self.key", "self_attn/key", heads)
             + _head_proj("attention.self.value", "self_attn/value", heads)
             + _head_out("attention.output.dense", "self_attn/out", heads)
             + _norm("attention.output.LayerNorm", "self_attn_norm"))
  if cross:
    entries += (_head_proj("crossattention.self.query", "cross_attn/query", heads)
                + _head_proj("crossattention.self.key", "cross_attn/key", heads)
                + _head_proj("crossattention.self.value", "cross_attn/value", heads)
                + _head_out("crossattention.output.dense", "cross_attn/out", heads)
                + _norm("crossattention.output.LayerNorm", "cross_attn_norm"))
  entries += (_linear("intermediate.dense", "mlp/wi") + _linear("output.dense", "mlp/wo")
              + _norm("output.LayerNorm", "mlp_norm"))
  return entries


def _bert_stack(official: str, flax: str, indices: Sequence[int], heads: int,
                cross: bool) -> list[Entry]:
  return _prefixed(_stack([_prefixed(_bert_layer(heads, cross), f"{official}{i}.", "")
                           for i in indices]), "", flax + "/")


def _bert_embeddings(official: str, flax: str) -> list[Entry]:
  return [_embed(f"{official}.word_embeddings", f"{flax}/word"),
          _embed(f"{official}.position_embeddings", f"{flax}/position"),
          _embed(f"{official}.token_type_embeddings", f"{flax}/token_type"),
          *_norm(f"{official}.LayerNorm", f"{flax}/norm")]


def _local_temporal(official: str, flax: str) -> list[Entry]:
  squeeze = lambda w: w.reshape(w.shape[0], w.shape[1])  # (out, in, 1, 1, 1) -> (out, in)
  unsqueeze = lambda k: k.T.reshape(*k.T.shape, 1, 1, 1)
  conv = Entry([f"{official}.conv.weight"], [f"{flax}/conv_kernel"],
               lambda a: [a[0].reshape(a[0].shape[0], 3).T],
               lambda a: [a[0].T.reshape(-1, 1, 3, 1, 1)])
  return [*_norm(f"{official}.ln", f"{flax}/norm"),
          Entry([f"{official}.down_proj.weight"], [f"{flax}/down/kernel"],
                lambda a: [squeeze(a[0]).T], lambda a: [unsqueeze(a[0])]),
          _same(f"{official}.down_proj.bias", f"{flax}/down/bias"),
          conv, _same(f"{official}.conv.bias", f"{flax}/conv_bias"),
          Entry([f"{official}.up_proj.weight"], [f"{flax}/up/kernel"],
                lambda a: [squeeze(a[0]).T], lambda a: [unsqueeze(a[0])]),
          _same(f"{official}.up_proj.bias", f"{flax}/up/bias")]


def _clip_block(heads: int, temporal: bool) -> list[Entry]:
  def fwd(a):
    w, b = a
    width = w.shape[1]
    out = []
    for i in range(3):
      wi, bi = w[i * width:(i + 1) * width], b[i * width:(i + 1) * width]
      out += [wi.T.reshape(width, heads, -1), bi.reshape(heads, -1)]
    return out

  def inv(a):
    ws = [k.reshape(k.shape[0], -1).T for k in a[0::2]]
    return [np.concatenate(ws), np.concatenate([b.reshape(-1) for b in a[1::2]])]

  in_proj = Entry(["attn.in_proj_weight", "attn.in_proj_bias"],
                  [f"attn/{n}/{p}" for n in ("query", "key", "value") for p in ("kernel", "bias")],
                  fwd, inv)
  entries = [in_proj, *_head_out("attn.out_proj", "attn/out", heads),
             *_norm("ln_1", "attn_norm"), *_norm("ln_2", "mlp_norm"),
             *_linear("mlp.c_fc", "mlp/wi"), *_linear("mlp.c_proj", "mlp/wo")]
  if temporal:
    entries += _local_temporal("lmhra1", "temporal1") + _local_temporal("lmhra2", "temporal2")
  return entries


def entries(m: ml_collections.ConfigDict) -> list[Entry]:
  """Every official key the model of `config.model` uses, mapped to its Flax leaves."""
  v, t = m.vision, m.text
  modules = mplug2_config.TASK_MODULES[m.task]
  out: list[Entry] = []
  ve = "visual_encoder.visual."
  out += [_same(ve + "class_embedding", "vision/class_embedding"),
          _same(ve + "positional_embedding", "vision/positional_embedding"),
          Entry([ve + "conv1.weight"], ["vision/patch_embed/kernel"],
                lambda a: [a[0].transpose(2, 3, 4, 1, 0)],
                lambda a: [a[0].transpose(4, 3, 0, 1, 2)]),
          *_norm(ve + "ln_pre", "vision/ln_pre"), *_norm(ve + "ln_post", "vision/ln_post")]
  vheads = v.width // v.head_dim
  out += _prefixed(_stack([_prefixed(_clip_block(vheads, v.temporal_adapter),
                                     f"{ve}transformer.resblocks.{i}.", "")
                           for i in range(v.layers)]), "", "vision/blocks/")
  if v.width != t.hidden_size:
    out += _linear("visn_fc", "visn_fc") + _norm("visn_layer_norm", "visn_layer_norm")
  out += _norm("visn_emb_norm", "visn_emb_norm")

  heads = t.num_heads
  first_uni = t.encoder_layers - t.universal_layers
  te = "text_encoder.encoder.layer."
  out.append(_same(f"{te}{first_uni}.latents", "text_encoder/latent_queries"))
  for j in range(t.universal_layers):
    out += _prefixed(_bert_layer(heads, cross=True), f"{te}{first_uni + j}.",
                     f"text_encoder/universal_{j}/")
  if "text" in modules:
    out += _bert_embeddings("text_encoder.embeddings", "text_encoder/embeddings")
    if first_uni:
      out += _bert_stack(te, "text_encoder/text_layers", range(first_uni), heads, cross=False)
  if "fusion" in modules:
    start = fusion_start(t)
    kinds = [j > 0 and j % t.fusion_stride == 0 for j in range(running_fusion_layers(t))]
    for joint, s, n in stack.runs(kinds):
      out += _bert_stack("fusion_encoder.encoder.layer.", f"fusion/layers_{s}/layer",
                         range(start + s, start + s + n), heads, cross=not joint)
  if "decoder" in modules:
    out += _bert_embeddings("text_decoder.bert.embeddings", "decoder/embeddings")
    out += _bert_stack("text_decoder.bert.encoder.layer.", "decoder/layers",
                       range(t.decoder_layers), heads, cross=True)
    out += [_same("text_decoder.cls.predictions.bias", "decoder/head/bias"),
            *_linear("text_decoder.cls.predictions.transform.dense", "decoder/head/transform"),
            *_norm("text_decoder.cls.predictions.transform.LayerNorm", "decoder/head/norm")]
  return out


def running_fusion_layers(t: ml_collections.ConfigDict) -> int:
  return min(t.fusion_layers, t.fusion_layers_built)


def fusion_start(t: ml_collections.ConfigDict) -> int:
  """Official index of the first running fusion layer (the last `fusion_layers` run)."""
  return max(0, t.fusion_layers_built - t.fusion_layers)


MOMENTUM_KEY = r"^[a-z_]+_m\."  # the distillation copies: visual_encoder_m.*, ...
# Official keys that the task's forward never reads (spec sections 2.1, 3.3, 4, 5, 12).
# (regex, reason). Tied copies are checked for equality rather than ignored.
TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}
UNUSED_RULES = (
    (r"^visual_encoder\.(transformer|token_embedding|positional_embedding|ln_final|"
     r"text_projection|logit_scale)", "CLIP text tower, kept in the state dict, never run"),
    (r"^visual_encoder\.visual\.proj$", "CLIP projection, not applied by mPLUG-2"),
    (r"\.position_ids$", "position-id buffer (positions are computed)"),
    (r"\.(intermediate_vision|output_vision)\.", "vision FFN of universal layers, never called"),
    (r"^text_decoder\.bert\.encoder\.layer\.\d+\.latents$", "decoder latents, never used"),
    (r"^fusion_encoder\.embeddings\.", "fusion embeddings, the fusion model takes embeddings"),
    (MOMENTUM_KEY, "momentum (distillation) copy; its loss term has weight 0"),
    (r"^(text_encoder|fusion_encoder)\.cls\.", "MLM head of the pretraining checkpoint; no "
     "task model has it"),
)


def unused_reason(key: str, m: ml_collections.ConfigDict) -> str | None:
  for pattern, reason in UNUSED_RULES:
    if re.search(pattern, key):
      return reason
  modules = mplug2_config.TASK_MODULES[m.task]
  t = m.text
  if key.startswith("fusion_encoder."):
    if "fusion" not in modules:
      return f"fusion model, not used by the {m.task} task"
    match = re.match(r"fusion_encoder\.encoder\.layer\.(\d+)\.", key)
    if match and int(match.group(1)) < fusion_start(t):
      return "fusion layer built but not run (only the last fusion_layers run)"
    if match and ".crossattention." in key:
      return "cross-attention of a joint-attention fusion layer, unused"
  if key.startswith("text_encoder.") and "text" not in modules:
    return f"text-only part of the text encoder, not used by the {m.task} task"
  if key.startswith("text_decoder.") and "decoder" not in modules:
    return f"decoder, not used by the {m.task} task"
  return None


def to_flax(state: dict[str, np.ndarray], m: ml_collections.ConfigDict,
            expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
  """Official state dict -> flat {flax path: array}; strict key and shape accounting.

  `expected` (flax path -> shape) checks every produced leaf against the model.
  """
  table = entries(m)
  used = {k for e in table for k in e.official}
  for key in state:
    if key in used or key in TIED:
      continue
    if unused_reason(key, m) is None:
      raise ConversionError(f"unexpected official key {key!r} {tuple(state[key].shape)}: "
                            f"not used by the {m.task} model and not on the unused list")
  for tied, source in TIED.items():
    if tied in state and source in state and not np.array_equal(state[tied], state[source]):
      raise ConversionError(f"{tied!r} must equal its tied source {source!r}")
  flat = {}
  for e in table:
    missing = [k for k in e.official if k not in state]
    if missing:
      raise ConversionError(f"missing official key {missing[0]!r} (needed for {e.flax[0]})")
    arrays = e.to_flax([np.asarray(state[k]) for k in e.official])
    for path, value in zip(e.flax, arrays):
      if expected is not None:
        if path not in expected:
          raise ConversionError(f"{e.official[0]!r} maps to {path!r}, which the model lacks")
        if tuple(value.shape) != tuple(expected[path]):
          raise ConversionError(
              f"official key {e.official[0]!r} -> {path!r}: shape {tuple(value.shape)} "
              f"but the model expects {tuple(expected[path])}")
      flat[path] = value
  if expected is not None:
    unfilled = sorted(set(expected) - set(flat))
    if unfilled:
      heads = sorted({u.split("/")[0] for u in unfilled} & {"itc_head", "itm_head", "mlm_head"})
      hint = (f"; the official key names of the pretraining heads ({', '.join(heads)}) are "
              f"not known (no official pretraining code): import an official checkpoint "
              f"into a task config (caption, videoqa, grounding), as the official "
              f"fine-tuning loads the pretrained one") if heads else ""
      raise ConversionError(f"model parameter {unfilled[0]!r} has no official key "
                            f"({len(unfilled)} unfilled){hint}")
  return flat


def to_official(flat: dict[str, np.ndarray], m: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Flat {flax path: array} -> the official keys our model holds (plus tied copies)."""
  out = {}
  for e in entries(m):
    for key, value in zip(e.official, e.to_official([np.asarray(flat[p]) for p in e.flax])):
      out[key] = value
  for tied, source in TIED.items():
    if source in out:
      out[tied] = out[source]
  return out


# ---- configs --------------------------------------------------------------------------


def model_config_from_official(case: dict) -> ml_collections.ConfigDict:
  """`config.model` from an official config (golden `config.json` layout: the task YAML
  keys under "config", the BERT json under "bert_config", the CLIP architecture under
  "clip_arch")."""
  yaml, bert, clip = case["config"], case["bert_config"], case["clip_arch"]
  m = mplug2_config.model_config("tiny", case.get("task", "videoqa"))
  m.vision.update(width=clip["vision_width"], layers=clip["vision_layers"],
                  patch_size=clip["vision_patch_size"],
                  temporal_downsampling=bool(yaml.get("temporal_downsampling", False)),
                  temporal_stride=yaml.get("temporal_stride", 2))
  m.update(image_size=yaml["image_res"], num_frames=yaml["model_num_frames"])
  m.text.update(
      hidden_size=bert["hidden_size"], num_heads=bert["num_attention_heads"],
      intermediate_size=bert["intermediate_size"], vocab_size=bert["vocab_size"],
      max_position_embeddings=bert["max_position_embeddings"],
      type_vocab_size=bert["type_vocab_size"], layer_norm_eps=bert["layer_norm_eps"],
      hidden_act=bert["hidden_act"], pad_token_id=bert.get("pad_token_id", 0),
      encoder_layers=bert["text_encoder_layers"], universal_layers=bert["num_uni_layer"],
      fusion_layers=bert["fusion_layers"], fusion_layers_built=bert["num_hidden_layers"],
      fusion_stride=bert["stride_layer"], decoder_layers=bert["text_decode_layers"],
      dropout=bert.get("hidden_dropout_prob", 0.1),
      attention_dropout=bert.get("attention_probs_dropout_prob", 0.1))
  m.official.update(distill=bool(yaml.get("distill", False)), embed_dim=clip["embed_dim"],
                    context_length=clip["context_length"], vocab_size=clip["vocab_size"],
                    text_width=clip["transformer_width"], text_layers=clip["transformer_layers"])
  if m.vision.width != yaml.get("vision_width", m.vision.width):
    raise ConversionError(f"config.vision_width={yaml['vision_width']} but the CLIP "
                          f"architecture has width {m.vision.width}")
  return m


# ---- the official pretraining checkpoint ------------------------------------------------

# Modules of the official task models; a pretraining checkpoint's other top-level modules
# (ITC projections, temperature, ITM head, feature queues) have no place in a task model.
TASK_MODULE_PREFIXES = ("visual_encoder.", "text_encoder.", "fusion_encoder.", "text_decoder.",
                        "visn_fc.", "visn_layer_norm.", "visn_emb_norm.")


def finetuning_key(key: str) -> str:
  """The key the official fine-tuning scripts give a pretraining-checkpoint key: "bert."
  and "fusion." are dropped from every key that names bert or fusion, decoder keys
  excepted (official video_qa_mplug2.py:294-298, video_caption_mplug2.py:279-283). The
  pretraining model wraps the text encoder and the fusion model in MLM models
  (`text_encoder.bert.*`, `fusion_encoder.bert.*`); the task models do not."""
  if ("bert" in key or "fusion" in key) and "decoder" not in key:
    return key.replace("fusion.", "").replace("bert.", "")
  return key


def is_pretraining_layout(state: Mapping) -> bool:
  return any(k.startswith(("text_encoder.bert.", "fusion_encoder.bert.")) for k in state)


class PretrainingStateDict(Mapping):
  """An official pretraining checkpoint seen as the fine-tuning scripts load it.

  Keys are renamed by `finetuning_key`. Keys of modules no task model has (the ITC/ITM
  heads, the temperature, the feature queues: `left_out`) are dropped, as the official
  `load_state_dict(strict=False)` drops them; the MLM heads (`*.cls.*`) and momentum copies
  stay and meet `UNUSED_RULES`. Two keys renamed to one is an error naming both.
  """

  def __init__(self, state: Mapping):
    self.state, self.names, self.left_out = state, {}, []
    for key in state:
      name = finetuning_key(key)
      if not name.startswith(TASK_MODULE_PREFIXES) and not re.match(MOMENTUM_KEY, name):
        self.left_out.append(key)
        continue
      if name in self.names:
        raise ConversionError(f"official keys {self.names[name]!r} and {key!r} both become "
                              f"{name!r} under the fine-tuning renaming")
      self.names[name] = key

  def __getitem__(self, key):
    return self.state[self.names[key]]

  def __iter__(self):
    return iter(self.names)

  def __len__(self):
    return len(self.names)


# ---- resolution change and complete export ------------------------------------------------


class AdaptedStateDict(Mapping):
  """An official state dict seen at the model's resolution (positional table resized)."""

  KEY = "visual_encoder.visual.positional_embedding"

  def __init__(self, state: Mapping, m: ml_collections.ConfigDict):
    self.state, self.grid = state, m.image_size // m.vision.patch_size
    self.resized_from = None

  def __getitem__(self, key):
    value = self.state[key]
    if key == self.KEY and value.shape[0] != 1 + self.grid * self.grid:
      self.resized_from = value.shape
      value = resize_positional_embedding(np.asarray(value), self.grid)
    return value

  def __iter__(self):
    return iter(self.state)

  def __len__(self):
    return len(self.state)


def export_state(flat: dict[str, np.ndarray], m: ml_collections.ConfigDict,
                 reference: Mapping | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """Our parameters -> every key of the official task model (strict-loadable).

  Keys our model holds are converted; the keys the official model builds but never runs
  come from `reference` (an official checkpoint) when given; otherwise momentum copies
  (`*_m`) copy their main weights, position-id buffers are `arange`, and the remaining
  never-used tensors are zeros. Returns the state dict and counts of each source.
  """
  from mplug2_jax.convert.mplug2 import layout

  ours = to_official(flat, m)
  full = layout.official_layout(m)
  out, counts = {}, {"converted": 0, "reference": 0, "momentum_copy": 0, "buffer": 0, "zeros": 0}
  for key, (shape, dtype) in full.items():
    main = re.sub(r"^([a-z_]+?)_m\.", r"\1.", key)
    if key in ours:
      value, source = ours[key], "converted"
    elif reference is not None and key in reference:
      value, source = np.asarray(reference[key]), "reference"
      if tuple(value.shape) != tuple(shape):
        raise ConversionError(f"reference key {key!r} has shape {tuple(value.shape)}, the "
                              f"official model needs {tuple(shape)}")
    elif key.endswith(".position_ids"):
      value, source = np.arange(shape[-1], dtype=np.int64).reshape(shape), "buffer"
    elif main != key and main in ours:
      value, source = ours[main], "momentum_copy"
    else:
      value, source = np.zeros(shape, dtype), "zeros"
    if tuple(value.shape) != tuple(shape):
      raise ConversionError(f"export of {key!r}: shape {tuple(value.shape)} but the official "
                            f"model has {tuple(shape)}")
    out[key] = value
    counts[source] += 1
  return out, counts
