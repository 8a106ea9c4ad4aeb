r"""mPLUG-2 video/image captioning model (MSRVTT, MSVD, COCO).

Modules: video encoder -> universal layers -> shared decoder (spec section 6.1).
Sizes: tiny (tests, seconds on CPU), base (ViT-B/16 + BERT-base), large (ViT-L/14 +
BERT-large, the released model: 621,853,498 parameters used by this task).

Command (forward + timing until training lands; runs in ~20 s for tiny on 2 CPU cores and
prints the step time and the caption loss of random weights, about ln(vocab)):
  python -m mplug2_jax.benchmark --config configs/caption.py:tiny
  python -m mplug2_jax.benchmark --config configs/caption.py:large --config.model.num_frames=8
"""

from mplug2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large")
  config = config_lib.base_config(a.size, task="caption")
  config.batch_size = 2 if a.size == "tiny" else 4   # official batch_size_train per GPU: 4
  config.text_length = 20                            # official caption max_length
  config.optimizer.accum_steps = 2                   # official --accum_steps default
  return config
