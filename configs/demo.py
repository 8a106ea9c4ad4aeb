r"""Tiny mPLUG-2 on the embedded demo dataset: pretraining, then caption / QA fine-tuning.

Videos of moving coloured shapes and template captions (`python -m mplug2_jax.data.demo`).
`task=pretrain` (default): ITC + ITM + MLM + captioning (prefix LM) on the video-text pairs
mixed with the demo's still images (image-text pairs, repeated to the clip length).
`task=caption` / `task=videoqa` / `task=classification` (the motion direction, 4 classes:
the temporal modules matter): fine-tuning from `init=DIR` (a finished run's workdir: it
exports params/ + model_config.json). A few minutes each on 2 CPU cores; the whole
chain with evaluation is `python -m mplug2_jax.demo_job` (the README's main job):

  python -m mplug2_jax.data.demo --out /tmp/demo
  python -m mplug2_jax.main --config configs/demo.py:data=/tmp/demo --workdir /tmp/demo_run
  python -m mplug2_jax.main --config configs/demo.py:data=/tmp/demo,task=videoqa,init=/tmp/demo_run \
      --workdir /tmp/demo_qa

Arguments (comma-separated key=value after the colon):
  data=DIR        the demo dataset directory (video_retrieval/, image_text/, video_caption/,
                  video_qa/, video_classification/)
  task=T          pretrain | caption | videoqa | classification
  init=DIR        initial parameters (orbax params dir + model_config.json); "" = scratch
  steps=N         optimizer steps (default: pretrain 400, classification 600, others 150)
  images=W        pretraining mixing weight of the image-text pairs (0 = videos only)
  image_size=P    input resolution (default 32; the demo clips are 64 px)
  synthetic=1     random inputs instead of the dataset (no data needed; tests, timing)

From scratch the [CLS] features of a randomly initialised BERT/ViT are almost identical
across samples (cosine 0.99997 at init), so dropout noise, not content, dominates the first
ITC gradients and ITC never leaves ln(batch + queue) (measured: flat at 4.35 for 300 steps
with dropout 0.1). The demo therefore trains without dropout; the official fine-tuning
configs, which start from pre-trained CLIP / BERT weights, keep it. For the same reason
the demo's ITC has no feature queue: the queue fills with copies of the momentum model's
collapsed features, and ITC stays collapsed (measured, ITC alone, 150 steps: queue of 64
-> text-video cosine constant across pairs; no queue -> loss 1.89 from 2.77 and distinct
features). The momentum model's distillation (alpha 0.4) is kept; `configs/pretrain.py`
keeps the official 65,536-entry queue.
"""

import os

from mplug2_jax import config_lib, experiment


DATASETS = {"pretrain": "video_retrieval", "caption": "video_caption", "videoqa": "video_qa",
            "classification": "video_classification"}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, data="/tmp/demo", task="pretrain", init="", steps=0,
                           images=0.5, synthetic=False, batch=16, image_size=32)
  if a.task not in DATASETS:
    raise config_lib.ConfigError("demo task", a.task, f"must be one of {tuple(DATASETS)}")
  pretrain = a.task == "pretrain"
  config = experiment.base_config("tiny", task=a.task)
  m = config.model
  m.num_frames = 4
  m.image_size = a.image_size
  m.num_classes = 4 if a.task == "classification" else 0  # the four motion directions
  m.text.vocab_size = 30522        # the BERT uncased WordPiece vocabulary
  m.text.max_position_embeddings = 32

  m.text.dropout = 0.0             # see the docstring: dropout stalls ITC from scratch
  m.text.attention_dropout = 0.0

  config.batch_size = a.batch      # global batch
  text_length = 16                 # tokens of every text field
  # Direction needs the temporal modules and is learnt slowest (top-1 35 % at 300 steps,
  # 52 % at 600; chance 27 %); a classification step is ~4x cheaper than a QA step.
  config.total_steps = a.steps or {"pretrain": 400, "classification": 600}.get(a.task, 150)

  d = config.data
  d.task = a.task
  d.vocab_file = "bert-base-uncased"  # the vocabulary shipped with the package
  d.mixture = ((os.path.join(a.data, DATASETS[a.task]), 1.0),)
  if pretrain and a.images:
    d.mixture += ((os.path.join(a.data, "image_text"), a.images),)
  d.repeat_images = True           # an image is a still clip of num_frames frames
  d.max_text_len = text_length
  d.text_words = 30
  d.max_caption_len = text_length
  d.max_question_len = text_length
  d.max_answer_len = 6             # "[CLS] answer [SEP]": one-word answers
  d.randaug = False                # tiny 32 px inputs: crops only
  d.hflip = False                  # a flip turns "moves to the left" into a wrong caption
  config.synthetic_data = a.synthetic

  o = config.optimizer
  o.lr = 3e-3 if pretrain else 2e-3  # a from-scratch model this small: 1e-3 was too slow
  o.lr_mults = ()                  # from scratch: one learning rate for every tower
  o.warmup_steps = 20 if pretrain else 10
  o.warmup_lr = 1e-5
  o.min_lr = 1e-5
  o.grad_clip_norm = 1.0

  obj = config.objective
  obj.queue_size = 0               # in-batch ITC; see the docstring
  obj.momentum = 0.99

  # The recipe the demo table (docs/training.md) is measured with, which differs from the
  # official mechanics the paper configs default to (docs/official_quirks.md): the
  # cosine clock not shifted by the warm-up, no scheduler lag, the hard-negative weights
  # + 1e-5, the decoder trained on [CLS] text, the still images through the video
  # transforms.
  o.warmup_prefix = False
  o.lr_lag = False
  obj.hard_negative_eps = 1e-5
  d.pretrain_lm_targets = "text"
  d.image_transform = "video"

  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.checkpoint.async_save = True

  if not pretrain:                 # in-loop evaluation on the held-out split; best kept
    config.eval_every_steps = config.total_steps // 2
    config.eval.batch_size = 16
    config.checkpoint.best_metric = {"caption": "eval/CIDEr", "videoqa": "eval/accuracy",
                                     "classification": "eval/top1"}[a.task]

  config.log_every_steps = 10
  config.peak_tflops = 0.1         # per device; a CPU core does ~0.05-0.1 TFLOP/s fp32
  config.init_checkpoint = a.init  # a parameters directory (param_store.py), "" = scratch
  config.seed = 0
  return config
