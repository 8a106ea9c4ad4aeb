"""Config defaults, model size presets, the sharding-rules table, and config validation.

Experiment files in `configs/` build on `base_config()` and `model_config()`; every key
has a default here with a comment. `validate()` runs before any compute and raises a
`ConfigError` naming the offending key.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from mplug2_jax.models import layers

# --------------------------------------------------------------------------------------
# Model size presets (spec section 1 and mplug2_keys/README.md).
# --------------------------------------------------------------------------------------

# CLIP vision towers: width, blocks, patch size.
VISION_PRESETS = {
    "tiny": dict(width=64, layers=2, patch_size=8),
    "base": dict(width=768, layers=12, patch_size=16),   # ViT-B/16
    "large": dict(width=1024, layers=24, patch_size=14),  # ViT-L/14
}
# Input resolution and frames (official fine-tuning: 224 px, 16 frames).
INPUT_PRESETS = {
    "tiny": dict(image_size=32, num_frames=4),
    "base": dict(image_size=224, num_frames=16),
    "large": dict(image_size=224, num_frames=16),
}
# BERT towers (configs/config_bert*.json of the official code). The official fusion model
# builds `fusion_layers_built` (its json's num_hidden_layers) layers and runs the last
# `fusion_layers`; we build only those that run (the count is kept for conversion).
TEXT_PRESETS = {
    "tiny": dict(hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=512,
                 max_position_embeddings=32, encoder_layers=4, universal_layers=2,
                 fusion_layers=3, fusion_layers_built=4, fusion_stride=2, decoder_layers=2),
    # config_bert.json: 12 text layers (2 universal), 12 fusion built / last 3 run.
    "base": dict(hidden_size=768, num_heads=12, intermediate_size=3072, vocab_size=30522,
                 max_position_embeddings=512, encoder_layers=12, universal_layers=2,
                 fusion_layers=3, fusion_layers_built=12, fusion_stride=100,
                 decoder_layers=12),
    # config_bert_large_text.json: 24 text layers (2 universal), 24 fusion built / 6 run.
    "large": dict(hidden_size=1024, num_heads=16, intermediate_size=4096, vocab_size=30522,
                  max_position_embeddings=512, encoder_layers=24, universal_layers=2,
                  fusion_layers=6, fusion_layers_built=24, fusion_stride=1000,
                  decoder_layers=12),
}
SIZES = tuple(VISION_PRESETS)
# What the official CLIP checkpoint adds beyond the vision tower (the unused CLIP text
# tower and projection). Only checkpoint export reads these, to write every official key.
OFFICIAL_CLIP_EXTRAS = {
    "tiny": dict(embed_dim=32, context_length=4, vocab_size=8, text_width=64, text_layers=1),
    "base": dict(embed_dim=512, context_length=77, vocab_size=49408, text_width=512,
                 text_layers=12),   # ViT-B-16.tar
    "large": dict(embed_dim=768, context_length=77, vocab_size=49408, text_width=768,
                  text_layers=12),  # ViT-L-14.tar
}

DTYPES = ("float32", "bfloat16", "float16")


def model_config(size: str = "tiny", task: str = "videoqa") -> ml_collections.ConfigDict:
  """`config.model` for a size preset and task."""
  if size not in SIZES:
    raise ConfigError("model.size", size, f"must be one of {SIZES}")
  m = ml_collections.ConfigDict()
  m.size = size
  m.task = task               # which modules are built and run: see models/mplug2.py TASKS
  m.image_size = INPUT_PRESETS[size]["image_size"]  # square input resolution (pixels)
  m.num_frames = INPUT_PRESETS[size]["num_frames"]  # frames per video (an image is 1 frame)
  m.dtype = "float32"         # compute dtype; "bfloat16" on accelerators
  m.param_dtype = "float32"   # storage dtype of the parameters
  m.attention = "auto"        # "auto" (cuDNN on GPU for bf16/fp16, "explicit" on CPU,
                              # "chunked" on TPU) | "xla" | "cudnn" | "explicit" | "chunked"
                              # (models/layers.py)
  m.remat_policy = "none"     # "none" (fast, memory-hungry) | "dots_with_no_batch_dims_saveable"
                              # | "dots_saveable" | "full" (slowest, leanest)
  m.embed_dim = 256           # ITC projection width
  m.temp = 0.07               # ITC temperature init
  m.num_classes = 0           # classification head outputs (0 = no head)

  m.vision = ml_collections.ConfigDict(dict(
      head_dim=64,             # CLIP uses width // 64 heads
      mlp_ratio=4,
      ln_eps=1e-5,
      temporal_adapter=True,   # LocalTemporal modules in every block
      temporal_downsampling=False,  # patch conv kernel (3, p, p), stride (temporal_stride, p, p)
      temporal_stride=2,
      **VISION_PRESETS[size]))
  m.text = ml_collections.ConfigDict(dict(
      layer_norm_eps=1e-12,
      hidden_act="gelu",       # exact erf GELU
      type_vocab_size=2,
      pad_token_id=0,
      num_latents=50,          # learnable latent queries of the first universal layer
      dropout=0.1,             # hidden dropout (BERT); only active when training
      attention_dropout=0.1,   # attention-probability dropout; only active when training
      **TEXT_PRESETS[size]))
  # Official-checkpoint metadata (export only): CLIP extras, and whether the VideoQA
  # checkpoint carries the `*_m` momentum copies (`distill: true` in the released YAMLs).
  m.official = ml_collections.ConfigDict(dict(distill=task == "videoqa",
                                              **OFFICIAL_CLIP_EXTRAS[size]))
  return m


# --------------------------------------------------------------------------------------
# Sharding: mesh and the one rules table.
# --------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). Grouped by area.
DEFAULT_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # weights
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("position", None),
    ("latents", None),
    ("conv_time", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("classes", None),
)


def mesh_config(shape=(1, -1, 1)) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      axes=MESH_AXES,
      shape=tuple(shape),  # one entry may be -1: all remaining devices
  ))


def base_config(size: str = "tiny", task: str = "videoqa") -> ml_collections.ConfigDict:
  """Every section with its defaults; each section's keys are documented where defined."""
  from mplug2_jax import data  # noqa: local imports keep `import config_lib` light
  from mplug2_jax.train import checkpointing, objectives, optimizer

  config = ml_collections.ConfigDict()
  config.model = model_config(size, task)
  config.mesh = mesh_config()
  config.sharding_rules = DEFAULT_RULES
  config.data = data.default_data_config()                  # data/__init__.py
  config.optimizer = optimizer.default_optimizer_config()   # train/optimizer.py
  config.objective = objectives.default_objective_config()  # train/objectives.py
  config.checkpoint = checkpointing.default_checkpoint_config()  # train/checkpointing.py
  config.total_steps = 0          # optimizer steps of the run (the cosine schedule's length)
  config.max_nonfinite_steps = 10  # consecutive non-finite steps that stop the run
  config.log_every_steps = 10     # console / JSONL / TensorBoard interval
  config.peak_tflops = 0.0        # per-device peak for MFU (0 = not reported)
  config.init_checkpoint = ""     # orbax params dir (convert import-official / init-pretrained)
  config.synthetic_data = False   # random batches instead of config.data (timing, tests)
  config.seed = 0
  # In-loop evaluation on data.eval_split (train/loop.make_evaluator); 0 = off.
  config.eval_every_steps = 0
  config.eval_task = ""           # "" = model.task; e.g. "retrieval" for a pretraining run
  from mplug2_jax.evaluate import tasks
  config.eval = tasks.eval_config(task)  # evaluate/tasks.py: the evaluators' settings
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`get_config` argument: "large" or "large,task=caption" or "size=base,mode=local".

  A bare first token sets `size`; `key=value` pairs are typed by the defaults and an
  unknown key raises, naming it.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for i, token in enumerate(t.strip() for t in (arg or "").split(",") if t.strip()):
    key, sep, value = token.partition("=")
    if not sep:
      if i != 0 or "size" not in defaults:
        raise ConfigError("arg", arg, f"bare token {token!r}: use key=value")
      key, value = "size", token
    if key not in defaults:
      raise ConfigError("arg", arg, f"unknown key {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = type(default)(value) if default is not None else value
  return parsed


# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------


class ConfigError(ValueError):
  """A bad config value; the message starts with the full key."""

  def __init__(self, key: str, value: Any, problem: str):
    self.key = key
    super().__init__(f"config.{key}={value!r}: {problem}")


def _check(ok: bool, key: str, value: Any, problem: str):
  if not ok:
    raise ConfigError(key, value, problem)


def validate_model(m: ml_collections.ConfigDict) -> None:
  from mplug2_jax.models import mplug2  # noqa: local import keeps config_lib light

  _check(m.task in mplug2.TASKS, "model.task", m.task, f"must be one of {mplug2.TASKS}")
  for key in ("dtype", "param_dtype"):
    _check(m[key] in DTYPES, f"model.{key}", m[key], f"must be one of {DTYPES}")
  _check(m.attention in layers.ATTENTION_IMPLEMENTATIONS, "model.attention", m.attention,
         f"must be one of {layers.ATTENTION_IMPLEMENTATIONS}")
  _check(m.remat_policy in layers.REMAT_POLICIES, "model.remat_policy", m.remat_policy,
         f"must be one of {sorted(layers.REMAT_POLICIES)}")
  _check(m.embed_dim > 0, "model.embed_dim", m.embed_dim, "must be positive")
  modules = mplug2.TASK_MODULES[m.task]
  _check("classifier" not in modules or m.num_classes > 0, "model.num_classes",
         m.num_classes, "the classification task needs num_classes > 0")

  v = m.vision
  for key in ("image_size", "num_frames"):
    _check(isinstance(m[key], int) and m[key] > 0, f"model.{key}", m[key],
           "must be a positive integer")
  for key in ("width", "layers", "patch_size", "head_dim"):
    _check(isinstance(v[key], int) and v[key] > 0, f"model.vision.{key}", v[key],
           "must be a positive integer")
  _check(v.width % v.head_dim == 0, "model.vision.width", v.width,
         f"not divisible by model.vision.head_dim={v.head_dim} (heads = width // head_dim)")
  _check(m.image_size % v.patch_size == 0, "model.image_size", m.image_size,
         f"not a multiple of model.vision.patch_size={v.patch_size}")
  _check(not v.temporal_adapter or v.width % 2 == 0, "model.vision.width", v.width,
         "the temporal adapter halves the width: it must be even")
  if v.temporal_downsampling:
    _check(v.temporal_stride > 0 and m.num_frames % v.temporal_stride == 0,
           "model.num_frames", m.num_frames,
           f"temporal downsampling needs a multiple of model.vision.temporal_stride="
           f"{v.temporal_stride}")

  t = m.text
  for key in ("hidden_size", "num_heads", "intermediate_size", "vocab_size",
              "max_position_embeddings", "type_vocab_size", "num_latents"):
    _check(isinstance(t[key], int) and t[key] > 0, f"model.text.{key}", t[key],
           "must be a positive integer")
  _check(t.hidden_size % t.num_heads == 0, "model.text.hidden_size", t.hidden_size,
         f"not divisible by model.text.num_heads={t.num_heads}")
  _check(t.hidden_act in layers.ACTIVATIONS, "model.text.hidden_act", t.hidden_act,
         f"must be one of {sorted(layers.ACTIVATIONS)}")
  _check(1 <= t.universal_layers <= t.encoder_layers, "model.text.universal_layers",
         t.universal_layers, f"must be in [1, model.text.encoder_layers={t.encoder_layers}]")
  if "fusion" in modules:
    _check(t.fusion_layers >= 1, "model.text.fusion_layers", t.fusion_layers, "must be >= 1")
    _check(t.fusion_layers_built >= 1, "model.text.fusion_layers_built",
           t.fusion_layers_built, "must be >= 1")
    _check(t.fusion_stride >= 1, "model.text.fusion_stride", t.fusion_stride, "must be >= 1")
  if "decoder" in modules:
    _check(t.decoder_layers >= 1, "model.text.decoder_layers", t.decoder_layers, "must be >= 1")
  for key in ("dropout", "attention_dropout"):
    _check(0.0 <= t[key] < 1.0, f"model.text.{key}", t[key], "must be in [0, 1)")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """The concrete mesh shape (resolving one -1) for `num_devices`; validates it."""
  axes, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  _check(len(axes) == len(shape), "mesh.shape", shape,
         f"needs one size per axis of mesh.axes={axes}")
  _check(len(set(axes)) == len(axes), "mesh.axes", axes, "axis names must be unique")
  _check(all(s == -1 or (isinstance(s, int) and s > 0) for s in shape), "mesh.shape", shape,
         "sizes must be positive or -1")
  _check(shape.count(-1) <= 1, "mesh.shape", shape, "at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    _check(num_devices % known == 0, "mesh.shape", shape,
           f"the fixed axes ({known} devices) do not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  _check(math.prod(shape) == num_devices, "mesh.shape", shape,
         f"multiplies to {math.prod(shape)} but there are {num_devices} devices")
  return shape


def validate_rules(config: ml_collections.ConfigDict) -> None:
  mesh_axes = set(config.mesh.axes)
  seen = set()
  for i, rule in enumerate(config.sharding_rules):
    key = f"sharding_rules[{i}]"
    _check(len(rule) == 2, key, rule, "a rule is (logical_axis, mesh_axes)")
    name, target = rule
    _check(name in layers.LOGICAL_AXES, key, rule,
           f"unknown logical axis {name!r}; known: {layers.LOGICAL_AXES}")
    _check(name not in seen, key, rule, f"logical axis {name!r} has two rules")
    seen.add(name)
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
      _check(t in mesh_axes, key, rule, f"mesh axis {t!r} is not in mesh.axes={tuple(config.mesh.axes)}")
  missing = [a for a in layers.LOGICAL_AXES if a not in seen]
  _check(not missing, "sharding_rules", "...", f"no rule for logical axes {missing}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the key of the first problem; cheap, no compute."""
  validate_model(config.model)
  validate_rules(config)
  if num_devices is not None:
    shape = dict(zip(config.mesh.axes, mesh_shape(config, num_devices)))
    batch_ways = shape.get("data", 1) * shape.get("fsdp", 1)
    if "batch_size" in config:
      _check(config.batch_size % batch_ways == 0, "batch_size", config.batch_size,
             f"not divisible by the data x fsdp mesh axes ({batch_ways} ways)")
