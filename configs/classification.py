r"""mPLUG-2 video action recognition fine-tuning (Kinetics-400/600/700): video encoder +
linear head on the class token, softmax cross-entropy (spec section 6; the paper's
classification setting, spec section 14).

mPLUG-2 releases no classification recipe: the optimiser and schedule are the values the
released fine-tuning YAMLs share (spec section 10: AdamW 2e-5 with the vision tower at 0.1x,
weight decay 0.02, cosine_step, 200 warm-up iterations from 1e-6, min_lr 1e-6, 10 epochs,
224 px, 16 frames, 8 GPUs x 4). [unverified for classification]

Arguments: size (tiny|base|large), classes (400|600|700), data=DIR (a built kinetics
dataset), train_examples (K400: 240000 clips), epochs (10), init=DIR, smoothing (label
smoothing, 0), synthetic=1 (random batches instead of a dataset: timing runs; without
data= the config fails).

  python -m mplug2_jax.main --config configs/classification.py:large,classes=400,data=/data/k400,init=/ckpt/mplug2_large \
      --workdir /runs/k400
  python -m mplug2_jax.benchmark --config "configs/classification.py:size=large,classes=600"
"""

from mplug2_jax import config_lib, experiment


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", classes=400, data="", train_examples=240000,
                           epochs=10, init="", smoothing=0.0, synthetic=False)
  config = experiment.base_config(a.size, task="classification")
  config.model.num_classes = a.classes
  config.batch_size = 2 if a.size == "tiny" else 32  # 4 per GPU x 8 GPUs
  config.model.dtype = "float32" if a.size == "tiny" else "bfloat16"

  d = config.data
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.task = "classification"

  # Optimizer: the defaults (train/optimizer.py) are the official fine-tuning values:
  # AdamW lr 2e-5 (vision tower 0.1x), wd 0.02, cosine_step, 200 warm-up iterations
  # from 1e-6, min_lr 1e-6, no clipping.
  config.objective.label_smoothing = a.smoothing

  config.total_steps, steps_per_epoch = config_lib.steps_for_epochs(
      a.epochs, a.train_examples, config.batch_size)
  config.checkpoint.every_steps = steps_per_epoch
  config.eval_every_steps = steps_per_epoch          # top-1 / top-5 every epoch
  config.checkpoint.best_metric = "eval/top1"
  config.log_every_steps = 50
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42
  return config
