"""mPLUG-2 size presets, `config.model` defaults and their validation.

Presets follow the official configs (`configs/config_bert*.json`, CLIP ViT-B/16 and
ViT-L/14); `tiny` is the golden tiny configuration, so tests run the real code paths.
"""

from __future__ import annotations

import ml_collections

from mplug2_jax import config_lib
from mplug2_jax.layers import activations

check = config_lib.check

TASKS = ("caption", "videoqa", "retrieval", "pretrain", "grounding", "classification")
# Which modules each task builds and runs (only those have parameters).
TASK_MODULES = {
    "caption": {"vision", "universal", "decoder"},
    "videoqa": {"vision", "universal", "text", "fusion", "decoder"},
    "grounding": {"vision", "universal", "text", "fusion", "decoder"},
    "retrieval": {"vision", "universal", "text", "fusion", "itc", "itm"},
    "pretrain": {"vision", "universal", "text", "fusion", "decoder", "itc", "itm", "mlm"},
    "classification": {"vision", "classifier"},
}

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
# BERT towers. The official fusion model builds `fusion_layers_built` (its json's
# num_hidden_layers) layers and runs the last `fusion_layers`; only those that run are
# built here (the count is kept for conversion).
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


def model_config(size: str = "tiny", task: str = "videoqa") -> ml_collections.ConfigDict:
  """`config.model` for a size preset and task."""
  check(size in SIZES, "model.size", size, f"must be one of {SIZES}")
  check(task in TASKS, "model.task", task,
        f"must be one of {TASKS}{config_lib.did_you_mean(task, TASKS)}")
  m = ml_collections.ConfigDict()
  m.name = "mplug2"           # model family (models/registry.py)
  m.size = size
  m.task = task               # which modules are built and run: TASK_MODULES
  m.image_size = INPUT_PRESETS[size]["image_size"]  # square input resolution (pixels)
  m.num_frames = INPUT_PRESETS[size]["num_frames"]  # frames per video (an image is 1 frame)
  m.dtype = "float32"         # compute dtype; "bfloat16" on accelerators
  m.param_dtype = "float32"   # storage dtype of the parameters
  m.attention = "auto"        # "auto" (cuDNN on GPU for bf16/fp16, "explicit" on CPU,
                              # "chunked" on TPU) | "xla" | "cudnn" | "explicit" | "chunked"
                              # (layers/attention_op.py)
  m.remat_policy = "none"     # layers/stack.py REMAT_POLICIES, from "none" (fast,
                              # memory-hungry) to "full" (slowest, leanest)
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


def _positive_ints(section, prefix: str, keys) -> None:
  for key in keys:
    check(isinstance(section[key], int) and section[key] > 0, f"{prefix}.{key}",
          section[key], "must be a positive integer")


def validate(m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad `config.model` key (mPLUG-2 specific keys;
  the keys every family has are checked by the registry)."""
  check(m.task in TASKS, "model.task", m.task,
        f"must be one of {TASKS}{config_lib.did_you_mean(m.task, TASKS)}")
  check(m.embed_dim > 0, "model.embed_dim", m.embed_dim, "must be positive")
  modules = TASK_MODULES[m.task]
  check("classifier" not in modules or m.num_classes > 0, "model.num_classes",
        m.num_classes, "the classification task needs num_classes > 0")

  v = m.vision
  _positive_ints(m, "model", ("image_size", "num_frames"))
  _positive_ints(v, "model.vision", ("width", "layers", "patch_size", "head_dim"))
  check(v.width % v.head_dim == 0, "model.vision.width", v.width,
        f"not divisible by model.vision.head_dim={v.head_dim} (heads = width // head_dim)")
  check(m.image_size % v.patch_size == 0, "model.image_size", m.image_size,
        f"not a multiple of model.vision.patch_size={v.patch_size}")
  check(not v.temporal_adapter or v.width % 2 == 0, "model.vision.width", v.width,
        "the temporal adapter halves the width: it must be even")
  if v.temporal_downsampling:
    check(v.temporal_stride > 0 and m.num_frames % v.temporal_stride == 0,
          "model.num_frames", m.num_frames,
          f"temporal downsampling needs a multiple of model.vision.temporal_stride="
          f"{v.temporal_stride}")

  t = m.text
  _positive_ints(t, "model.text", ("hidden_size", "num_heads", "intermediate_size",
                                   "vocab_size", "max_position_embeddings", "type_vocab_size",
                                   "num_latents"))
  check(t.hidden_size % t.num_heads == 0, "model.text.hidden_size", t.hidden_size,
        f"not divisible by model.text.num_heads={t.num_heads}")
  check(t.hidden_act in activations.ACTIVATIONS, "model.text.hidden_act", t.hidden_act,
        f"must be one of {sorted(activations.ACTIVATIONS)}")
  check(1 <= t.universal_layers <= t.encoder_layers, "model.text.universal_layers",
        t.universal_layers, f"must be in [1, model.text.encoder_layers={t.encoder_layers}]")
  if "fusion" in modules:
    for key in ("fusion_layers", "fusion_layers_built", "fusion_stride"):
      check(t[key] >= 1, f"model.text.{key}", t[key], "must be >= 1")
  if "decoder" in modules:
    check(t.decoder_layers >= 1, "model.text.decoder_layers", t.decoder_layers, "must be >= 1")
  for key in ("dropout", "attention_dropout"):
    check(0.0 <= t[key] < 1.0, f"model.text.{key}", t[key], "must be in [0, 1)")
