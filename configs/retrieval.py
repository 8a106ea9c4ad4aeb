r"""mPLUG-2 text-video / text-image retrieval model (MSRVTT, DiDeMo, LSMDC, COCO, Flickr30K).

Modules: video encoder + universal layers and text encoder for ITC (projections to
`embed_dim` 256, learnable temperature), fusion model + ITM head for re-ranking.

Command (forward + timing until training lands):
  python -m mplug2_jax.benchmark --config configs/retrieval.py:tiny
"""

from mplug2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large")
  config = config_lib.base_config(a.size, task="retrieval")
  config.batch_size = 2 if a.size == "tiny" else 8
  config.text_length = 10 if a.size == "tiny" else 40
  return config
