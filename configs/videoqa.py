r"""mPLUG-2 video question answering model (MSRVTT-QA, MSVD-QA, TGIF; VQAv2 for images).

Modules: video encoder -> universal layers; question -> text encoder (all layers, text
mode) -> fusion with the image -> decoder over [fused image ; fused question] (spec 6.2).
Large: 1,031,533,370 parameters used by this task.

Command (forward + timing until training lands; tiny: ~20 s on 2 CPU cores):
  python -m mplug2_jax.benchmark --config configs/videoqa.py:tiny
"""

from mplug2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large")
  config = config_lib.base_config(a.size, task="videoqa")
  config.batch_size = 2 if a.size == "tiny" else 4
  config.text_length = 10 if a.size == "tiny" else 50  # official max_input_length
  return config
