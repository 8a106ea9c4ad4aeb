r"""mPLUG-2 video action recognition (Kinetics-400/600/700): video encoder + linear head.

Command (forward + timing until training lands):
  python -m mplug2_jax.benchmark --config configs/classification.py:tiny
  python -m mplug2_jax.benchmark --config "configs/classification.py:size=large,classes=600"
"""

from mplug2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", classes=400)
  config = config_lib.base_config(a.size, task="classification")
  config.model.num_classes = a.classes
  config.batch_size = 2 if a.size == "tiny" else 8
  config.text_length = 1
  return config
