r"""mPLUG-2 pretraining model: every module and head (ITC, ITM, MLM, prefix-LM decoder).

Hyper-parameters of the data mixture and schedule arrive with the training issue; this
file builds the full model (spec section 13).

Command (forward + timing until training lands):
  python -m mplug2_jax.benchmark --config configs/pretrain.py:tiny
"""

from mplug2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large")
  config = config_lib.base_config(a.size, task="pretrain")
  config.batch_size = 2 if a.size == "tiny" else 8
  config.text_length = 10 if a.size == "tiny" else 30
  return config
