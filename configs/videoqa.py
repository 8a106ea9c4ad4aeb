r"""mPLUG-2 video question answering fine-tuning (MSRVTT-QA, MSVD-QA, TGIF; VQAv2 for images).

Modules: video encoder -> universal layers; question -> text encoder (all layers, text
mode) -> fusion with the image -> decoder over [fused image ; fused question] (spec 6.2).
Large: 1,031,533,370 parameters used by this task.

Official recipe (spec section 10, `VideoQA_{msrvtt,msvd,tgif}_large.yaml` + `run_*.sh`):
AdamW lr1 2e-5 / lr2 2e-6 (vision tower), weight decay 0.02, `cosine_step` with 200
warm-up iterations from 1e-6 and min_lr 1e-6, 10 epochs, 4 videos per GPU x 8 GPUs = 32
per step, no accumulation, 224 px, 16 frames, max_input_length 50, answers min_length 1 /
max_length 10, beam 5, no gradient clipping.

Stepping: the scheduler steps after each iteration, so iteration i runs at sched(i - 1)
(`optimizer.lr_lag`, the default; M2 `video_qa_mplug2.py:81-98`).

Arguments: size, data=DIR (a built video_qa dataset), vqa=1 (VQAv2 + VG image data, M1's
VQA inputs: raw questions of up to 80 tokens, every distinct answer with its annotator-share
weight, VQA accuracy in the loop), train_examples (questions per epoch;
default 158581, the MSRVTT-QA train split [check against your build]), epochs (10),
init=DIR (a parameters directory from `python -m mplug2_jax.convert import-official`),
vocab=FILE (BERT vocab.txt; default the shipped bert-base-uncased), synthetic=1
(random batches instead of a dataset: timing runs; without data= the config fails).

  python -m mplug2_jax.main --config configs/videoqa.py:large,data=/data/msrvtt_qa,init=/ckpt/mplug2_large \
      --workdir /runs/videoqa_msrvtt
"""

from mplug2_jax import config_lib, experiment


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", data="", train_examples=158581, epochs=10,
                           init="", vocab="bert-base-uncased", synthetic=False, vqa=False)
  config = experiment.base_config(a.size, task="videoqa")
  config.batch_size = 2 if a.size == "tiny" else 32  # official: 4 per GPU x 8 GPUs
  config.model.dtype = "float32" if a.size == "tiny" else "bfloat16"  # official --do_amp

  d = config.data
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.task = "videoqa"
  d.vocab_file = a.vocab
  d.max_question_len = 10 if a.size == "tiny" else 50  # official max_input_length
  d.max_answer_len = 10                              # official max_length
  if a.vqa:  # M1 VQA data (datasets.md 3.4)
    d.question_preprocess = "raw"                    # M1: pre_question commented out
    d.answers_per_question = 10                      # every distinct answer with its weight
    d.max_question_len = 10 if a.size == "tiny" else 80
    d.repeat_images = True                           # images as still clips
    config.eval.qa_metric = "vqa"

  # Optimizer: the defaults (train/optimizer.py) are the official fine-tuning values:
  # AdamW lr 2e-5 (vision tower 0.1x), wd 0.02, cosine_step, 200 warm-up iterations
  # from 1e-6, min_lr 1e-6, no clipping.
  o = config.optimizer
  o.accum_steps = 1
  config.total_steps, steps_per_epoch = config_lib.steps_for_epochs(
      a.epochs, a.train_examples, config.batch_size)

  config.checkpoint.every_steps = steps_per_epoch
  config.eval_every_steps = steps_per_epoch          # official: evaluates every epoch
  config.checkpoint.best_metric = "eval/accuracy"    # keep the best epoch as well
  config.log_every_steps = 50
  config.peak_tflops = 0.0    # per-device peak for MFU
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42
  # Decoding for evaluation: config.eval (beam 5; evaluate/common.py GENERATION_DEFAULTS).
  return config
