"""mPLUG-Owl2 size presets, `config.model` defaults and their validation.

`7b` is the released model (`MPLUGOwl2Config()` defaults, `owl2.md` sections 1-4:
ViT-L/14 at 448 px, a 6-layer visual abstractor with 64 queries, LLaMA-2-7B with the
modality-adaptive module; 8,197,859,328 parameters). `tiny` is the golden `tiny_a`
configuration read into our keys, so tests run the real code paths.

Official config names -> ours (`convert/owl2/official.py` reads and writes them):
  visual_model.{hidden_size, num_hidden_layers, patch_size, intermediate_size,
                layer_norm_eps, image_size, num_attention_heads}
      -> vision.{width, layers, patch_size, mlp_dim, ln_eps}, image_size,
         vision.head_dim = hidden_size / num_attention_heads
  visual_abstractor.{hidden_size, num_attention_heads, intermediate_size,
                     num_hidden_layers, num_learnable_queries, layer_norm_eps, grid_size}
      -> abstractor.{hidden_size, num_heads, intermediate_size, layers, num_queries,
                     layer_norm_eps, grid_size}
  top level (LLaMA) -> llm.{vocab_size, hidden_size, intermediate_size, layers (=
      num_hidden_layers), num_heads, num_kv_heads, rms_norm_eps, rope_theta,
      max_position_embeddings, pad/bos/eos_token_id}
"""

from __future__ import annotations

import ml_collections

from mplug2_jax import config_lib

check = config_lib.check

TASKS = ("instruct",)  # next-token loss on the labelled (answer) tokens, images spliced in
TASK_MODULES = {"instruct": {"vision", "abstractor", "llm"}}

# Vision tower (official `visual_model`): width, blocks, patch, MLP width, head size.
VISION_PRESETS = {
    "tiny": dict(width=32, layers=2, patch_size=14, mlp_dim=80, head_dim=8),
    "7b": dict(width=1024, layers=24, patch_size=14, mlp_dim=4096, head_dim=64),  # ViT-L/14
}
IMAGE_SIZES = {"tiny": 56, "7b": 448}
# Visual abstractor (official `visual_abstractor`).
ABSTRACTOR_PRESETS = {
    "tiny": dict(hidden_size=32, num_heads=2, intermediate_size=48, layers=2, num_queries=8,
                 grid_size=4),
    "7b": dict(hidden_size=1024, num_heads=16, intermediate_size=2816, layers=6,
               num_queries=64, grid_size=32),
}
# LLaMA decoder (official top-level fields).
LLM_PRESETS = {
    "tiny": dict(vocab_size=1000, hidden_size=40, intermediate_size=96, layers=3, num_heads=5,
                 num_kv_heads=5, max_position_embeddings=256),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, layers=32,
               num_heads=32, num_kv_heads=32, max_position_embeddings=2048),  # LLaMA-2-7B
}
SIZES = tuple(VISION_PRESETS)


def model_config(size: str = "tiny", task: str = "instruct") -> ml_collections.ConfigDict:
  """`config.model` for a size preset."""
  check(size in SIZES, "model.size", size,
        f"must be one of {SIZES}{config_lib.did_you_mean(size, SIZES)}")
  check(task in TASKS, "model.task", task,
        f"must be one of {TASKS}{config_lib.did_you_mean(task, TASKS)}")
  m = ml_collections.ConfigDict()
  m.name = "owl2"             # model family (models/registry.py)
  m.size = size
  m.task = task
  m.image_size = IMAGE_SIZES[size]  # square input (pixels); fixed by the positional table
  m.dtype = "float32"         # compute dtype; "bfloat16" on accelerators (official: fp16)
  m.param_dtype = "float32"   # storage dtype of the parameters
  m.attention = "auto"        # layers/attention_op.py: auto | xla | cudnn | explicit | chunked
  m.remat_policy = "none"     # layers/stack.py REMAT_POLICIES, per scanned layer
  m.vision = ml_collections.ConfigDict(dict(
      mlp_ratio=4,             # unused when mlp_dim is set (models/vit.py)
      ln_eps=1e-6,             # every ViT LayerNorm (official layer_norm_eps)
      temporal_adapter=False,  # mPLUG-2's video adapters: not in Owl2
      temporal_downsampling=False,
      temporal_stride=1,
      **VISION_PRESETS[size]))
  m.abstractor = ml_collections.ConfigDict(dict(
      layer_norm_eps=1e-6,     # the SwiGLU's inner LayerNorm (ffn_ln), from the config
      norm_eps=1e-5,           # norm1 / normk / norm2: PyTorch's default eps (the official
                               # code ignores the config there, owl2.md section 3)
      init_std=0.02,           # normal std of the abstractor's kernels at init (official:
                               # LLaMA's N(0, 0.02), owl2.md section 10; the from-scratch
                               # demo uses more, demo_job.OWL2_ABSTRACTOR_INIT_STD)
      **ABSTRACTOR_PRESETS[size]))
  m.llm = ml_collections.ConfigDict(dict(
      rms_norm_eps=1e-6,       # MPLUGOwl2Config default (LLaMA-2 itself: 1e-5)
      rope_theta=10000.0,
      num_modalities=2,        # modality-adaptive module: 0 = text, 1 = image
      pad_token_id=0,          # <unk> (official training pads with it)
      bos_token_id=1,
      eos_token_id=2,
      **LLM_PRESETS[size]))
  from mplug2_jax.models.owl2 import lora
  m.lora = lora.default_config()  # LoRA adapters (models/owl2/lora.py); rank 0 = off
  return m


def tokens_per_image(m: ml_collections.ConfigDict) -> int:
  """LLM positions one image takes: the abstractor's queries plus the end token."""
  return int(m.abstractor.num_queries) + 1


def vision_tokens(m: ml_collections.ConfigDict) -> int:
  """ViT output tokens per image: class token + patch grid."""
  return 1 + (int(m.image_size) // int(m.vision.patch_size)) ** 2


def _positive_ints(section, prefix: str, keys) -> None:
  for key in keys:
    check(isinstance(section[key], int) and section[key] > 0, f"{prefix}.{key}",
          section[key], "must be a positive integer")


def validate(m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad Owl2 `config.model` key (the keys every
  family has are checked by the registry)."""
  check(m.task in TASKS, "model.task", m.task,
        f"must be one of {TASKS}{config_lib.did_you_mean(m.task, TASKS)}")
  v, a, t = m.vision, m.abstractor, m.llm
  _positive_ints(m, "model", ("image_size",))
  _positive_ints(v, "model.vision", ("width", "layers", "patch_size", "head_dim", "mlp_dim"))
  check(v.width % v.head_dim == 0, "model.vision.width", v.width,
        f"not divisible by model.vision.head_dim={v.head_dim} (heads = width // head_dim)")
  check(not v.temporal_adapter and not v.temporal_downsampling, "model.vision.temporal_adapter",
        v.temporal_adapter, "mPLUG-Owl2's ViT has no temporal modules")
  check(m.image_size % v.patch_size == 0, "model.image_size", m.image_size,
        f"not a multiple of model.vision.patch_size={v.patch_size}")
  # Official bug 12: the ViT slices its positional table and the abstractor's key table
  # has grid_size^2 + 1 rows, so only this one image size works.
  _positive_ints(m.abstractor, "model.abstractor", ("grid_size",))
  fixed = a.grid_size * v.patch_size
  check(m.image_size == fixed, "model.image_size", m.image_size,
        f"the positional tables fix the image size at {fixed} px (model.abstractor."
        f"grid_size={a.grid_size} x model.vision.patch_size={v.patch_size}; no interpolation)")

  _positive_ints(a, "model.abstractor", ("hidden_size", "num_heads", "intermediate_size",
                                         "layers", "num_queries", "grid_size"))
  check(a.hidden_size == v.width, "model.abstractor.hidden_size", a.hidden_size,
        f"must equal model.vision.width={v.width} (official encoder_hidden_size: the "
        f"abstractor's norms are sized by the ViT width)")
  check(a.hidden_size % a.num_heads == 0, "model.abstractor.hidden_size", a.hidden_size,
        f"not divisible by model.abstractor.num_heads={a.num_heads}")
  check(a.hidden_size % 4 == 0, "model.abstractor.hidden_size", a.hidden_size,
        "the 2-D sin-cos key table needs a multiple of 4")
  for key in ("layer_norm_eps", "norm_eps"):
    check(a[key] > 0, f"model.abstractor.{key}", a[key], "must be > 0")

  _positive_ints(t, "model.llm", ("vocab_size", "hidden_size", "intermediate_size", "layers",
                                  "num_heads", "num_kv_heads", "max_position_embeddings"))
  check(t.hidden_size % t.num_heads == 0, "model.llm.hidden_size", t.hidden_size,
        f"not divisible by model.llm.num_heads={t.num_heads}")
  check((t.hidden_size // t.num_heads) % 2 == 0, "model.llm.num_heads", t.num_heads,
        "rotary embeddings need an even head size")
  check(t.num_heads % t.num_kv_heads == 0, "model.llm.num_kv_heads", t.num_kv_heads,
        f"must divide model.llm.num_heads={t.num_heads} (grouped-query attention)")
  check(t.num_modalities == 2, "model.llm.num_modalities", t.num_modalities,
        "the modality-adaptive module has a text and an image branch")
  check(t.rms_norm_eps > 0, "model.llm.rms_norm_eps", t.rms_norm_eps, "must be > 0")
  check(t.rope_theta > 0, "model.llm.rope_theta", t.rope_theta, "must be > 0")
  lo = m.get("lora")
  if lo is not None:
    check(isinstance(lo.rank, int) and lo.rank >= 0, "model.lora.rank", lo.rank,
          "must be an integer >= 0 (0 = no adapters)")
    check(lo.alpha > 0, "model.lora.alpha", lo.alpha, "must be > 0")
  for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
    check(0 <= t[key] < t.vocab_size, f"model.llm.{key}", t[key],
          f"must be a token id in [0, model.llm.vocab_size={t.vocab_size})")


def validate_data(m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
  """The batch's image size must be the model's (official bug 12: the positional tables
  fix it); 0 means the model's."""
  size = d.get("image_size", 0)
  check(size in (0, m.image_size), "data.image_size", size,
        f"must be 0 or model.image_size={m.image_size}: the positional tables fix the image "
        f"size (no interpolation)")
