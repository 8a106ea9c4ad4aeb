r"""mPLUG-2 video/image captioning fine-tuning (MSRVTT, MSVD, COCO), official hyper-parameters.

Modules: video encoder -> universal layers -> shared decoder (spec section 6.1).
Sizes: tiny (tests, seconds on CPU), base (ViT-B/16 + BERT-base), large (ViT-L/14 +
BERT-large, the released model: 621,853,498 parameters used by this task).

Official recipe (spec section 10, `VideoCaption_msrvtt_large.yaml` + `run_*.sh`): AdamW
lr1 2e-5 (text side) / lr2 2e-6 (vision tower), weight decay 0.02 (not on biases and BERT
LayerNorm gains), `cosine_step` with 200 warm-up iterations from 1e-6 and min_lr 1e-6,
10 epochs, 4 videos per GPU x 8 GPUs = 32 per iteration, `--accum_steps 2` (one optimizer
step per 2 iterations: our batch_size = 64 split into 2 micro-batches of 32, and the
schedule counts optimizer steps, so warm-up = 200 / 2; the epoch-0 lr dips of the official
`step_size = 100` stepping are reproduced, `optimizer.epoch0_dips`), 224 px, 16 frames,
prompt "a video of", caption max_length 20, beam 5, min_length 4, no gradient clipping;
the loss is a token mean per device, averaged (`objective.token_mean`).

Arguments: size (tiny|base|large), data=DIR (a built video_caption dataset),
train_examples (captions per epoch; MSRVTT: 6513 train videos x 20 = 130260),
epochs (10), init=DIR (a parameters directory from `python -m mplug2_jax.convert
import-official`), vocab=FILE (BERT vocab.txt; default the shipped bert-base-uncased), synthetic=1
(random batches instead of a dataset: timing runs; without data= the config fails).

  python -m mplug2_jax.main --config configs/caption.py:large,data=/data/msrvtt_caption,init=/ckpt/mplug2_large \
      --workdir /runs/caption_msrvtt
"""

from mplug2_jax import config_lib, experiment


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", data="", train_examples=130260, epochs=10,
                           init="", vocab="bert-base-uncased", synthetic=False)
  config = experiment.base_config(a.size, task="caption")
  accum = 2                                          # official --accum_steps default
  per_iteration = 2 if a.size == "tiny" else 32      # official: 4 per GPU x 8 GPUs
  config.batch_size = per_iteration * accum          # examples per optimizer step
  config.model.dtype = "float32" if a.size == "tiny" else "bfloat16"  # official --do_amp

  d = config.data
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.task = "caption"
  d.vocab_file = a.vocab
  d.max_caption_len = 20
  d.caption_prompt = "a video of"

  # Optimizer: the defaults (train/optimizer.py) are the official fine-tuning values:
  # AdamW lr 2e-5 (vision tower 0.1x), wd 0.02, cosine_step, 200 warm-up iterations
  # from 1e-6, min_lr 1e-6, no clipping.
  o = config.optimizer
  o.accum_steps = accum
  o.warmup_steps = 200 // accum                      # 200 iterations
  config.total_steps, steps_per_epoch = config_lib.steps_for_epochs(
      a.epochs, a.train_examples, config.batch_size)
  # Official stepping (train/optimizer.py): the scheduler steps after each iteration
  # (lr_lag, the default) and, in epoch 0, with i // 100 at every 100th iteration: the
  # next optimizer step runs at a warm-up value (`epoch0_dips=0` removes the dips).
  o.epoch0_dips = 100
  o.steps_per_epoch = steps_per_epoch

  config.checkpoint.every_steps = steps_per_epoch   # official: evaluates/saves every epoch
  config.eval_every_steps = steps_per_epoch          # official: evaluates every epoch
  config.checkpoint.best_metric = "eval/CIDEr"       # keep the best epoch as well
  config.log_every_steps = 50
  config.peak_tflops = 0.0    # per-device peak for MFU, e.g. 197 (v4), 459 (v5p), 989 (H100 bf16)
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42                                   # official: 42 + rank
  # Decoding for evaluation: config.eval (beam 5; evaluate/common.py GENERATION_DEFAULTS).
  return config
